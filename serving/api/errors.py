"""Error → HTTP mapping, in one place.

Every answer that is not a success has OpenAI's error shape:
``{"error": {"message", "type", "param", "code"}}``. Domain errors carry their status
(:mod:`coe.errors`) and, for 429/503, a ``Retry-After`` header; malformed JSON is 400; schema
problems are 422 naming the field; anything unexpected is logged and answered 500 without
internals. Errors of the transport to the expert servers (Ray's) are mapped to domain errors by
type where they arise (``serving/deployments/ray_deployments.py``), never here.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe.errors import CoEError

log = logging.getLogger("coe.serving")


def error_body(message: str, *, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: CoEError) -> JSONResponse:
    headers = None
    retry = getattr(err, "retry_after_s", None)
    if retry is not None:
        headers = {"Retry-After": str(max(1, math.ceil(retry)))}
    return JSONResponse(
        status_code=err.status_code,
        content=error_body(err.message, type_=err.code, code=err.code, param=err.param),
        headers=headers,
    )


def as_coe_error(err: BaseException) -> CoEError | None:
    """``err`` when it is a domain error, else None (the backends map transport errors by type)."""
    return err if isinstance(err, CoEError) else None


def _field(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        msg = detail.get("ctx", {}).get("error", "") if isinstance(detail.get("ctx"), dict) else ""
        return JSONResponse(
            status_code=400,
            content=error_body(f"the request body is not valid JSON: {msg}".rstrip(": "), type_="invalid_request_error",
                               code="invalid_json"),
        )
    problems = []
    first = None
    for e in errors:
        field = _field(e.get("loc", ()))
        first = first or field
        msg = e.get("msg", "invalid")
        if e.get("type") == "missing":
            msg = "is required"
        problems.append(f"{field}: {msg}")
    return JSONResponse(
        status_code=422,
        content=error_body("invalid request: " + "; ".join(problems), type_="invalid_request_error",
                           code="validation_error", param=first),
    )


async def _coe_handler(request: Request, exc: CoEError) -> JSONResponse:
    return error_response(exc)


async def _http_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        status_code=exc.status_code,
        content=error_body(str(exc.detail), type_="invalid_request_error", code=str(exc.status_code)),
        headers=getattr(exc, "headers", None),
    )


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    mapped = as_coe_error(exc)
    if mapped is not None:
        return error_response(mapped)
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(status_code=500, content=error_body("internal error", type_="server_error", code="internal"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(CoEError, _coe_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
