"""The ASGI layer in front of the app: the API key, then the body-size limit, before any
handler runs or any body byte is parsed.

    request ──► key check (401) ──► Content-Length over the limit? (413, body unread)
            ──► body read in chunks, counted (413 the moment it passes the limit) ──► the app

Every path needs the key except /health and the API docs (and /metrics with --metrics-public):
a path the router does not know is answered 404 only to a client that holds the key. The
limit is enforced while the body is read, so a client sending 200 MB, chunked or not, costs at
most the limit in memory and is never parsed; the replayed body is what FastAPI then parses.
"""
from __future__ import annotations

import hmac
import json

_PUBLIC = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _error(status: int, message: str, code: str, type: str = "invalid_request_error",
           headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()), *headers]}
    return start, body


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics_public: bool) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body_bytes
        self.public = _PUBLIC | ({"/metrics"} if metrics_public else set())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())   # last value of a repeated header wins
        if self.expected is not None and scope["path"] not in self.public:
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                return await self._reply(send, 401, "invalid or missing API key (Authorization: Bearer KEY)",
                                         "invalid_api_key", close=b"content-length" in headers
                                         or b"transfer-encoding" in headers)
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reply(send, 400, "Content-Length is not a number", "invalid_value", close=True)
            if int(length) > self.max_body:
                return await self._too_large(send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and length is None \
                and b"transfer-encoding" not in headers:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self._too_large(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)

    async def _too_large(self, send) -> None:
        await self._reply(send, 413, f"the request body is larger than this server's limit of "
                          f"{self.max_body} bytes (--max-body-bytes)", "request_too_large", close=True)

    @staticmethod
    async def _reply(send, status: int, message: str, code: str, close: bool = False) -> None:
        extra = [(b"connection", b"close")] if close else []
        if status == 401:
            extra.append((b"www-authenticate", b"Bearer"))
        start, body = _error(status, message, code, headers=extra)
        await send(start)
        await send({"type": "http.response.body", "body": body})
