"""/openapi.json as the server behaves: FastAPI's generated document, corrected where the
server answers differently from FastAPI's defaults.

- errors: every operation lists the statuses it can answer (400 not 422, 401 with a key, 404,
  405, 413, 429, 500, 503, 507), each with the OpenAI error body;
- security: a bearer scheme, required by every operation the key guards;
- media types: /metrics is Prometheus text, completions may stream `text/event-stream`,
  /health answers JSON with 200 or 503;
- limits this server enforces: the model id (404 for another), max_tokens, token ids inside the vocabulary, the
  size of a training sample, the three shapes /v1/train accepts.

A schema-driven fuzzer (schemathesis, see tests/serve/test_serve_contract.py) holds the server
to this document.
"""
from __future__ import annotations

from fastapi.openapi.utils import get_openapi

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"enum": ["ok", "starting", "degraded", "draining", "failed"]}}}
_WHY = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or path",
        413: "request body (or batch of samples) too large", 429: "too many requests or samples queued",
        500: "internal error", 503: "starting, shutting down, or a storage error",
        507: "the disk is full: samples not accepted"}


def install_openapi(app, host) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                              description="OpenAI-compatible serving with continuous training (LeMix).")
            _correct(doc, host)
            app.openapi_schema = doc
        return app.openapi_schema
    app.openapi = openapi


def _error(status: int) -> dict:
    return {"description": _WHY[status], "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _correct(doc: dict, host) -> None:
    opts, w = host.opts, host.cfg.workload
    comps = doc.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = _ERROR
    schemas["Health"] = _HEALTH
    comps["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "Authorization: Bearer KEY (--api-key, "
                                                          "LEMIX_API_KEY or --api-key-file)"}}
    public = {"/health"} | ({"/metrics"} if opts.metrics_public else set())
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            statuses = [500, 503]
            if "requestBody" in op:
                statuses += [400, 413]
            if path in ("/v1/completions", "/v1/chat/completions"):
                statuses += [404, 429]
            if path in ("/tokenize", "/detokenize") or path.startswith("/v1/models/"):
                statuses.append(404)
            if path == "/v1/train":
                statuses += [429, 507]
            if opts.api_key and path not in public:
                statuses.append(401)
                op["security"] = [{"bearer": []}]
            for st in statuses:
                responses.setdefault(str(st), _error(st))
            if path in ("/v1/completions", "/v1/chat/completions"):
                responses["200"]["content"]["text/event-stream"] = {"schema": {
                    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}},
                    "description": "with stream: true, one event per chunk (`data: {chunk JSON}`), an "
                                   "error event (`data: {\"error\": ...}`) if it fails or is cut, then "
                                   "`data: [DONE]`"}}
    doc["paths"]["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
    health = doc["paths"]["/health"]["get"]["responses"]
    health.clear()
    for st, why in (("200", "ready"), ("503", "starting, degraded, draining or failed")):
        health[st] = {"description": why, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
    _limits(schemas, host, w)


def _limits(schemas: dict, host, w) -> None:
    """The server's own limits, where JSON Schema can say them."""
    for name in ("CompletionRequest", "ChatRequest"):
        props = schemas[name]["properties"]
        props["model"] = {"type": "string", "enum": [host.model_name], "title": "Model"}
        for key in ("max_tokens", "max_completion_tokens"):
            if key in props:
                _set_max(props[key], w.max_output_tokens)
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]
    for alt in prompt.get("anyOf", []):
        items = alt.get("items", {})
        if items.get("type") == "integer":
            items["maximum"] = host.tok.vocab_size - 1
        elif alt.get("type") == "string":
            alt["maxLength"] = w.max_prompt_tokens - 1
        elif items.get("type") == "string":
            items["maxLength"] = w.max_prompt_tokens - 1
    sample = schemas["TrainSample"]["properties"]
    for key in ("text", "prompt", "completion"):
        for alt in sample[key].get("anyOf", [sample[key]]):
            if alt.get("type") == "string":
                alt["maxLength"] = host.opts.max_sample_chars // (2 if key != "text" else 1)
    ref = {"$ref": "#/components/schemas/TrainSample"}
    train = schemas["TrainRequest"]
    schemas["TrainRequest"] = {"title": "TrainRequest", "description": "one sample, a list of samples, "
                               "or {\"samples\": [...]}", "anyOf": [
                                   ref, {"type": "array", "items": ref, "minItems": 1},
                                   {k: v for k, v in train.items() if k != "title"}]}


def _set_max(prop: dict, maximum: int) -> None:
    for alt in prop.get("anyOf", [prop]):
        if alt.get("type") == "integer":
            alt["maximum"] = maximum
