"""The HTTP routes (thin): parse, call :class:`CoEService` / ``admin``, shape the response.

``create_api(service)`` builds the FastAPI app; the Ray ingress deployment serves the same app
(``serving/deployments/ingress.py``), and tests call it in-process. The OpenAPI document declares
the error responses and the two bearer schemes (``apiKey`` for chat when ``$COE_API_KEY`` is
set, ``adminKey`` for ``/v1/experts``); ``serving.openapi_docs: false`` turns ``/docs``,
``/redoc`` and ``/openapi.json`` off.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Body, FastAPI, Request, Security
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from coe.profile_records import ProfileJob
from coe.serving.api import admin, completions, recruit
from coe.serving.api.errors import install_error_handlers
from coe.serving.api.limits import BodyLimits
from coe.serving.api.models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    ExpertInfo,
    ModelCard,
    ModelList,
    RouteRequest,
)
from coe.serving.api.profiles import ProfileJobs
from coe.serving.api.service import CoEService
from coe.serving.deployments.hops import stamp
from coe.serving.metrics import CONTENT_TYPE_LATEST

EXPERT_HEADER = "x-coe-expert"
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, the access log shows it

_API_KEY = HTTPBearer(scheme_name="apiKey", auto_error=False,
                      description="$COE_API_KEY (the variable named by serving.api_key_env), when set: "
                      "chat, routing, models.")
_ADMIN_KEY = HTTPBearer(scheme_name="adminKey", auto_error=False,
                        description="$COE_ADMIN_KEY (the variable named by serving.admin_key_env): "
                        "expert registration.")
_WHY = {
    400: "Invalid request: names the field and what is allowed", 401: "No bearer token", 403: "Wrong key",
    404: "Unknown model or expert", 409: "Conflict (already registered, or in use)", 413: "Body too large",
    415: "Body is not JSON", 422: "Schema error naming the field", 429: "Expert at capacity (see Retry-After)",
    503: "Expert unavailable (see Retry-After)", 504: "No answer within the request deadline",
}


_EXPERT_BODY = Body(..., description="One expert, as in the config file's `experts` list, plus an optional "
                                     "`profile: {probe, budget}` to measure it in the background.")
_PROFILE_BODY = Body(..., description="`{probe: built-in name or file under serving.probe_roots, budget: N}`.")


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorResponse, "description": _WHY[c]} for c in codes}


def _token(creds: HTTPAuthorizationCredentials | None) -> str | None:
    return creds.credentials if creds is not None else None


class _ClosingStream(StreamingResponse):
    """Closes its event stream however the response ends (a client that left before the first
    byte included), so the generation and the expert's slot are always freed."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def until_disconnect(request: Request, work):
    """Await ``work``; if the client disconnects first, cancel it (which cancels the generation)
    and return None."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and watcher.done() and watcher.exception() is None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return await task
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


def create_api(service: CoEService) -> FastAPI:
    s = service.config.serving
    docs = s.openapi_docs
    app = FastAPI(title="coe", description="Composition-of-Experts router service (OpenAI-compatible)",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    install_error_handlers(app)
    app.add_middleware(BodyLimits, max_bytes=s.limits.max_body_bytes)
    app.state.service = service
    profiles = app.state.profiles = ProfileJobs(service)
    api_key, admin_key = Security(_API_KEY), Security(_ADMIN_KEY)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=_errors(400, 401, 403, 404, 413, 415, 422, 429, 503, 504))
    async def chat_completions(body: ChatCompletionRequest, request: Request, creds=api_key):
        """An answer from the routed (``model: coe``) or pinned expert; ``stream: true`` gives SSE.
        ``coe: {recruit: k, aggregate}`` aggregates the answers of k experts (``serving/api/recruit.py``)."""
        stamp("route.enter")
        service.check_api(_token(creds))
        if body.stream:
            info, events = await recruit.chat_stream(service, body)
            stamp("route.response")
            return _ClosingStream(events, media_type="text/event-stream",
                                  headers={EXPERT_HEADER: info.expert, "cache-control": "no-cache"})
        result = await until_disconnect(request, recruit.chat(service, body))
        if result is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(result.model_dump(mode="json"), headers={EXPERT_HEADER: result.model})

    @app.post("/v1/completions", response_model=completions.CompletionResponse,
              responses=_errors(400, 401, 403, 404, 413, 415, 422, 429, 503, 504))
    async def text_completions(body: completions.CompletionRequest, request: Request, creds=api_key):
        """OpenAI's legacy completion of a raw prompt (text or token ids), with ``echo`` and
        ``logprobs`` (what evaluation harnesses use); ``stream: true`` gives SSE."""
        service.check_api(_token(creds))
        if body.stream:
            info, events = await completions.complete_stream(service, body)
            return _ClosingStream(events, media_type="text/event-stream",
                                  headers={EXPERT_HEADER: info.expert, "cache-control": "no-cache"})
        result = await until_disconnect(request, completions.complete(service, body))
        if result is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(result.model_dump(mode="json"), headers={EXPERT_HEADER: result.model})

    @app.post("/v1/route", responses=_errors(400, 401, 403, 404, 413, 415, 422, 503))
    async def route(body: RouteRequest, creds=api_key):
        """The expert the router picks for a query, with the scores and the plan: ``candidates``, every
        expert best first with its live state (nothing is generated)."""
        service.check_api(_token(creds))
        decision = await service.route(body)
        return JSONResponse(decision, headers={EXPERT_HEADER: decision["expert"]})

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401, 403))
    async def models(creds=api_key):
        service.check_api(_token(creds))
        return service.models()

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=_errors(401, 403, 404))
    async def model(model_id: str, creds=api_key):
        service.check_api(_token(creds))
        return service.model_card(model_id)

    @app.get("/v1/experts", response_model=list[ExpertInfo], responses=_errors(401, 403))
    async def list_experts(creds=admin_key):
        service.check_admin(_token(creds))
        return await admin.list_experts(service, profiles)

    @app.get("/v1/experts/{expert_id}", response_model=ExpertInfo, responses=_errors(401, 403, 404))
    async def get_expert(expert_id: str, creds=admin_key):
        """One expert, with its runtime profile's progress (``profile``)."""
        service.check_admin(_token(creds))
        return await admin.get_expert(service, profiles, expert_id)

    @app.post("/v1/experts/{expert_id}/profile", response_model=ProfileJob, status_code=202,
              responses=_errors(400, 401, 403, 404, 409, 413, 415, 422))
    async def start_profile(expert_id: str, body: dict = _PROFILE_BODY, creds=admin_key):
        """(Re)start the expert's profile in the background; its progress shows in GET /v1/experts/{id}."""
        service.check_admin(_token(creds))
        return await admin.start_profile(service, profiles, expert_id, body)

    @app.post("/v1/experts", response_model=ExpertInfo, status_code=201,
              responses=_errors(400, 401, 403, 404, 409, 413, 415, 422, 503))
    async def add_expert(body: dict = _EXPERT_BODY, creds=admin_key):
        """Register a LoRA or model expert (all or nothing)."""
        service.check_admin(_token(creds))
        return await admin.add_expert(service, body, profiles)

    @app.delete("/v1/experts/{expert_id}", responses=_errors(400, 401, 403, 404, 409))
    async def remove_expert(expert_id: str, creds=admin_key):
        service.check_admin(_token(creds))
        await admin.remove_expert(service, expert_id, profiles)
        return {"id": expert_id, "deleted": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "Some expert of the config is not ready (the body says "
                                                       "which and why)"}})
    async def readyz():
        """200 once every expert of the config has loaded. The body gives each expert's reason when
        it is not ready; an expert registered at runtime that its server failed to load (its
        adapter folder is gone) is listed there but does not hold readiness."""
        ready, experts = await service.readiness()
        return JSONResponse({"ready": ready, "experts": experts}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        await service.refresh_gauges()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
