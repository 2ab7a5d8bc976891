"""HTTP checks made before a body is parsed, as ASGI middleware: size (413) and media type (415).

:class:`BodyLimits` answers 413 at once when ``Content-Length`` is over the limit and stops
reading a body without one as soon as it passes the limit; it answers 415 when a POST/PUT/PATCH
with a body under ``/v1/`` does not declare JSON. Everything else passes through unchanged,
with the body (read once, at most ``max_bytes``) replayed to the app.
"""

from __future__ import annotations

import json

from coe.errors import (
    CoEError,
    InvalidRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from coe.serving.api.errors import error_body

_METHODS = {"POST", "PUT", "PATCH"}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _answer(send, err: CoEError) -> None:
    body = json.dumps(error_body(err.message, type_=err.code, code=err.code)).encode()
    await send({"type": "http.response.start", "status": err.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    """ASGI middleware: ``BodyLimits(app, max_bytes=...)`` (see the module docstring)."""

    def __init__(self, app, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS:
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _answer(send, InvalidRequestError("Content-Length is not a number"))
            if n > self.max_bytes:
                return await _answer(send, PayloadTooLargeError(self._too_large(n)))
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _answer(send, PayloadTooLargeError(self._too_large(None)))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if body and scope["path"].startswith("/v1/") and not _is_json(headers.get(b"content-type", b"").decode("latin-1")):
            got = headers.get(b"content-type", b"").decode("latin-1") or "none"
            return await _answer(send, UnsupportedMediaTypeError(
                f"the request body must be JSON: send `Content-Type: application/json` (got {got})"))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the client to leave (http.disconnect)

        await self.app(scope, replay, send)

    def _too_large(self, n: int | None) -> str:
        size = f"{n} bytes" if n is not None else f"over {self.max_bytes} bytes"
        return (f"the request body is too large ({size}); allowed: at most {self.max_bytes} bytes "
                "(serving.limits.max_body_bytes)")
