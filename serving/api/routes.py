"""The HTTP routes (thin): parse, call :class:`CoEService` / ``admin``, shape the response.

``create_api(service)`` builds the FastAPI app; the Ray ingress deployment serves the same app
(``serving/deployments/ingress.py``), and tests call it in-process.
"""

from __future__ import annotations

from fastapi import Body, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from coe.serving.api import admin
from coe.serving.api.errors import install_error_handlers
from coe.serving.api.models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ExpertInfo,
    ModelList,
    RouteRequest,
)
from coe.serving.api.service import CoEService
from coe.serving.metrics import CONTENT_TYPE_LATEST

EXPERT_HEADER = "x-coe-expert"


def create_api(service: CoEService) -> FastAPI:
    app = FastAPI(title="coe", description="Composition-of-Experts router service (OpenAI-compatible)")
    install_error_handlers(app)
    app.state.service = service

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def chat_completions(body: ChatCompletionRequest, authorization: str | None = Header(None)):
        service.check_api(authorization)
        if body.stream:
            info, events = await service.chat_stream(body)
            return StreamingResponse(
                events, media_type="text/event-stream",
                headers={EXPERT_HEADER: info.expert, "cache-control": "no-cache"},
            )
        result = await service.chat(body)
        return JSONResponse(result.model_dump(mode="json"), headers={EXPERT_HEADER: result.model})

    @app.post("/v1/route")
    async def route(body: RouteRequest, authorization: str | None = Header(None)):
        service.check_api(authorization)
        decision = await service.route(body)
        return JSONResponse(decision, headers={EXPERT_HEADER: decision["expert"]})

    @app.get("/v1/models", response_model=ModelList)
    async def models(authorization: str | None = Header(None)):
        service.check_api(authorization)
        return service.models()

    @app.get("/v1/experts", response_model=list[ExpertInfo])
    async def list_experts(authorization: str | None = Header(None)):
        service.check_admin(authorization)
        return await admin.list_experts(service)

    @app.post("/v1/experts", response_model=ExpertInfo, status_code=201)
    async def add_expert(body: dict = Body(...), authorization: str | None = Header(None)):
        service.check_admin(authorization)
        return await admin.add_expert(service, body)

    @app.delete("/v1/experts/{expert_id}")
    async def remove_expert(expert_id: str, authorization: str | None = Header(None)):
        service.check_admin(authorization)
        await admin.remove_expert(service, expert_id)
        return {"id": expert_id, "deleted": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        ready, experts = await service.readiness()
        return JSONResponse({"ready": ready, "experts": experts}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request):
        await service.refresh_gauges()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
