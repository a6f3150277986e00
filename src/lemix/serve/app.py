"""The FastAPI app: OpenAI-compatible completions and chat, training ingestion, metrics.

    POST /v1/completions        prompt -> text (stream: SSE chunks, then `data: [DONE]`)
    POST /v1/chat/completions   messages -> assistant message (same streaming)
    GET  /v1/models
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
import json
import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lemix.engine.messages import SamplingParams
from lemix.serve import protocol as P
from lemix.serve.guard import Guard
from lemix.serve.host import EngineHost
from lemix.serve.protocol import APIError
from lemix.serve.schema import install_openapi
from lemix.serve.stream import Done, Failure, Stream
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
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        msg = "the request body must be a JSON object (Content-Type: application/json)"
    # drop the union-member tags pydantic puts in locations ("prompt.list[int].0" -> "prompt.0")
    param = ".".join(p for p in loc if "[" not in p and p not in _TYPE_TAGS) or None
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


# ---------------------------------------------------------------------- routes

def _routes(api: APIRouter, host: EngineHost) -> None:
    created = P.now_unix()
    w = host.cfg.workload

    def check_model(name: str) -> None:
        if name != host.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{host.model_name!r}", param="model", code="model_not_found")

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

    def start(body: P._Sampling, ids: list[int], max_tokens: int) -> Stream:
        temperature = 1.0 if body.temperature is None else body.temperature
        seed = body.seed if body.seed is not None else host.random_seed()
        sampling = SamplingParams(temperature, 1.0 if body.top_p is None else body.top_p, seed)
        return host.submit_infer(asyncio.get_running_loop(), ids, max_tokens, sampling,
                                 body.priority or 0, body.stops)

    @api.get("/models")
    async def models():
        host._check_open()
        return {"object": "list", "data": [{"id": host.model_name, "object": "model", "created": created,
                                            "owned_by": "lemix", "max_model_len": host.context_tokens}]}

    @api.post("/completions")
    async def completions(body: P.CompletionRequest):
        host._check_open()
        check_model(body.model)
        ids = _prompt_ids(host, body.prompt)
        max_tokens = check_lengths(len(ids), body.max_tokens, host.opts.default_max_tokens)
        stream = start(body, ids, max_tokens)
        rid, ts = P.new_id("cmpl"), P.now_unix()
        if body.stream:
            return _sse(stream, body, lambda text, fin: P.completion_chunk(rid, ts, host.model_name, text, fin),
                        first=None)
        text, done = await _collect(stream)
        return P.completion_body(rid, ts, host.model_name, text, done.finish_reason,
                                 P.usage(done.prompt_tokens, done.completion_tokens), done.extra())

    @api.post("/chat/completions")
    async def chat(body: P.ChatRequest):
        host._check_open()
        check_model(body.model)
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        ids = chat_prompt(host.tok, messages)
        max_tokens = check_lengths(len(ids), body.max_completion_tokens or body.max_tokens,
                                   w.max_output_tokens)
        stream = start(body, ids, max_tokens)
        rid, ts = P.new_id("chatcmpl"), P.now_unix()
        if body.stream:
            chunk = lambda text, fin: P.chat_chunk(rid, ts, host.model_name,  # noqa: E731
                                                   {"content": text} if text else {}, fin)
            return _sse(stream, body, chunk,
                        first=P.chat_chunk(rid, ts, host.model_name, {"role": "assistant", "content": ""}, None))
        text, done = await _collect(stream)
        return P.chat_body(rid, ts, host.model_name, text, done.finish_reason,
                           P.usage(done.prompt_tokens, done.completion_tokens), done.extra())

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


def _prompt_ids(host: EngineHost, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
        return host.tok.encode(prompt)
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    vocab = host.tok.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                       param="prompt", code="invalid_value")
    return list(prompt)


def _stream_error(f: Failure) -> dict:
    """The SSE error event: OpenAI's error body (its status in the body, the stream is 200)."""
    body = P.error_body(f.message, "server_error", None, f.code)
    body["error"]["status"] = f.status
    return body


async def _collect(stream: Stream) -> tuple[str, Done]:
    parts = []
    while True:
        kind, value = await stream.events.get()
        if kind == "delta":
            parts.append(value)
        elif kind == "done":
            return "".join(parts), value
        else:
            raise APIError(value.status, value.message, type="server_error", code=value.code)


def _sse(stream: Stream, body: P._Sampling, chunk, first: dict | None) -> StreamingResponse:
    """Server-sent events in OpenAI's chunk format; a client that goes away stops the sequence."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def event(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def gen():
        finished = False
        try:
            if first is not None:
                yield event(first)
            while True:
                kind, value = await stream.events.get()
                if kind == "delta":
                    yield event(chunk(value, None))
                    continue
                finished = True
                if kind == "done":
                    last = chunk("", value.finish_reason)
                    last["lemix"] = value.extra()
                    yield event(last)
                    if include_usage:
                        use = chunk("", None)
                        use["choices"], use["usage"] = [], P.usage(value.prompt_tokens, value.completion_tokens)
                        yield event(use)
                else:
                    yield event(_stream_error(value))
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:
                stream.cancelled = True
    return StreamingResponse(gen(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
