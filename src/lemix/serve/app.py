"""The FastAPI app: OpenAI-compatible completions and chat, training ingestion, metrics.

    POST /v1/completions        prompt -> text (stream: SSE chunks, then `data: [DONE]`)
    POST /v1/chat/completions   messages -> assistant message (same streaming)
    GET  /v1/models, /v1/models/{id}
    POST /tokenize, /detokenize   (vLLM's shapes)
    GET  /version
    POST /v1/train              {"text"} | {"prompt","completion"} | a list | {"samples": [...]}
    GET  /v1/train/status
    GET  /metrics               Prometheus text
    GET  /health

Every response to a completion carries `lemix: {inference_loss, weight_version, node, ttft_s,
e2e_s}`; inference_loss is the prompt's mean per-token NLL under the weights that served it
(None for a one-token prompt). With an API key, every path but /health and the docs (and
/metrics with --metrics-public) needs `Authorization: Bearer KEY`; the key and the body-size
limit are checked before a body is read (lemix.serve.guard). /openapi.json describes exactly
this (lemix.serve.schema).
"""
from __future__ import annotations

import asyncio
import re
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lemix.serve import generate as G
from lemix.serve import protocol as P
from lemix.serve.guard import Guard
from lemix.serve.host import EngineHost
from lemix.serve.protocol import APIError
from lemix.serve.schema import install_openapi
from lemix.serve.text import chat_prompt

log = logging.getLogger("lemix.serve")


def create_app(cfg=None, options=None, *, host: EngineHost | None = None, **host_kwargs) -> FastAPI:
    """The app over an EngineHost (built from cfg/options unless given). The engine thread starts
    with the app's lifespan and is drained, checkpointed and stopped when it ends."""
    if host is None:
        from lemix.serve.options import ServeOptions
        host = EngineHost(cfg, options or ServeOptions(), **host_kwargs)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        host.start(asyncio.get_running_loop())   # /health says "starting" until it is built
        yield
        await asyncio.to_thread(host.close)

    app = FastAPI(title="LeMix", version=_version(), lifespan=lifespan)
    app.state.host = host
    _install_errors(app)
    api = APIRouter(prefix="/v1")
    _routes(api, host)
    app.include_router(api)

    @app.get("/health")
    async def health():
        status, body = host.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(host.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        host._check_open()
        if body.model is not None:
            _check_model(host, body.model)
        if body.prompt is not None:
            ids = host.tok.encode(body.prompt, add_bos=body.add_special_tokens is not False)
        else:
            ids = chat_prompt(host.tok, [{"role": m.role, "content": m.text} for m in body.messages],
                              add_generation_prompt=body.add_generation_prompt is not False)
        out = {"count": len(ids), "max_model_len": host.context_tokens, "tokens": ids, "token_strs": None}
        if body.return_token_strs:
            out["token_strs"] = [host.tok.decode([t]) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        host._check_open()
        if body.model is not None:
            _check_model(host, body.model)
        G.prompt_of(host, body.tokens)   # ids inside the vocabulary
        return {"prompt": host.tok.decode(body.tokens)}

    install_openapi(app, host)
    app.add_middleware(Guard, api_key=host.opts.api_key, max_body_bytes=host.opts.max_body_bytes,
                       metrics_public=host.opts.metrics_public)
    return app


def _version() -> str:
    from lemix import __version__
    return __version__


# ---------------------------------------------------------------------- errors and auth

def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # the router's headers (a 405's Allow) are kept
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind,
                                        headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                        type="server_error", code="internal_error"))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    # of a union's several complaints, ours (a value error: a surrogate, an empty prompt) says most
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}",
                        code="invalid_json")
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unrecognized request argument; this server does not implement it"
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        msg = "the request body must be a JSON object (Content-Type: application/json)"
    # drop the union-member tags pydantic puts in locations ("prompt.list[int].0" -> "prompt.0")
    param = ".".join(p for p in loc if "[" not in p and p not in _TYPE_TAGS) or None
    if param is None:   # a check across fields (a model validator) names its field first
        word = re.match(r"\w+", msg)
        if word and word.group() in _FIELDS:
            return APIError(400, msg, param=word.group(), code="invalid_value")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


_FIELDS = set(P.CompletionRequest.model_fields) | set(P.ChatRequest.model_fields)


# ---------------------------------------------------------------------- routes

def _check_model(host: EngineHost, name: str) -> None:
    if name != host.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                       f"{host.model_name!r}", param="model", code="model_not_found")


def _routes(api: APIRouter, host: EngineHost) -> None:
    created = P.now_unix()
    w = host.cfg.workload

    def check_model(name: str) -> None:
        _check_model(host, name)

    def check_lengths(n_prompt: int, max_tokens: int | None, default: int) -> int:
        if n_prompt > w.max_prompt_tokens:
            raise APIError(400, f"the prompt has {n_prompt} tokens, more than this server's limit of "
                           f"{w.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        room = host.context_tokens - n_prompt
        if max_tokens is None:
            max_tokens = max(1, min(default, w.max_output_tokens, room))
        if max_tokens > w.max_output_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, more than this server's limit of "
                           f"{w.max_output_tokens}", param="max_tokens", code="invalid_value")
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {host.context_tokens} tokens; "
                           f"you requested {n_prompt + max_tokens} ({n_prompt} in the prompt, "
                           f"{max_tokens} to generate)", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    @api.get("/models")
    async def models():
        host._check_open()
        return {"object": "list", "data": [model_card()]}

    @api.get("/models/{model_id:path}")
    async def model(model_id: str):
        host._check_open()
        check_model(model_id)
        return model_card()

    def model_card() -> dict:
        return {"id": host.model_name, "object": "model", "created": created, "owned_by": "lemix",
                "max_model_len": host.context_tokens}

    @api.post("/completions")
    async def completions(body: P.CompletionRequest):
        host._check_open()
        check_model(body.model)
        return await G.completions(host, body, check_lengths)

    @api.post("/chat/completions")
    async def chat(body: P.ChatRequest):
        host._check_open()
        check_model(body.model)
        ids = chat_prompt(host.tok, [{"role": m.role, "content": m.text} for m in body.messages])
        return await G.chat(host, body, ids, check_lengths)

    @api.post("/train")
    async def train(body: P.TrainRequest):
        limit = host.opts.max_sample_chars
        for i, s in enumerate(body.samples):
            if s.chars > limit:
                raise APIError(400, f"sample {i} has {s.chars} characters, more than this server's limit "
                               f"of {limit} (--max-sample-chars; training uses its first "
                               f"{host.cfg.workload.train_seq_tokens} tokens)",
                               param=f"samples.{i}", code="sample_too_long")
        ids = await asyncio.to_thread(host.accept_samples, [s.payload() for s in body.samples])
        return {"object": "train.accepted", "accepted": len(ids), "sample_ids": ids,
                "queued": host.feed.queued}

    @api.get("/train/status")
    async def train_status():
        return await asyncio.to_thread(host.train_status)
