"""Error → HTTP mapping, in one place.

Every answer that is not a success has OpenAI's error shape:
``{"error": {"message", "type", "param", "code"}}``. Domain errors carry their status
(:mod:`coe.errors`); malformed JSON is 400; schema problems are 422 naming the field; anything
unexpected is logged and answered 500 without internals. Errors raised inside Ray replicas
arrive wrapped (``RayTaskError``) and are unwrapped by :func:`as_coe_error`.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe.errors import CoEError, EngineError

log = logging.getLogger("coe.serving")


def error_body(message: str, *, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(err: CoEError) -> JSONResponse:
    return JSONResponse(
        status_code=err.status_code,
        content=error_body(err.message, type_=err.code, code=err.code, param=err.param),
    )


def as_coe_error(err: BaseException) -> CoEError | None:
    """The domain error behind ``err`` (unwrapping Ray's wrappers); an engine that died or
    a replica that is gone becomes EngineError; None for anything else."""
    cause = getattr(err, "cause", None)  # Ray's RayTaskError (also an instance of the cause's class)
    if isinstance(cause, CoEError):
        return cause
    if isinstance(err, CoEError):
        return err
    name = type(err).__name__
    if name in {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
                "BackPressureError", "DeploymentUnavailableError", "RayTaskError"} or "Ray" in name:
        return EngineError(f"an expert server failed: {name}: {str(err).splitlines()[0][:300] if str(err) else ''}")
    return None


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
