"""Runtime expert registration: ``/v1/experts`` GET/POST/DELETE.

Registering is all-or-nothing: the body is validated, a LoRA's folder must lie under one of
``serving.adapter_roots`` and be a PEFT LoRA of a rank the base engine accepts, and it must load
on the base's running engine; a model must resolve and its new server must start. Only then is
the expert written to the registry and handed to the router. Any failure undoes what was done
and raises (400/404/409/503), so nothing half-registered remains.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from coe.config import Expert, LoraExpert, MixtureExpert, ModelExpert, format_validation_error
from coe.errors import (
    AdapterError,
    ConfigError,
    DuplicateExpertError,
    ExpertNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
    available,
)
from coe.serving.api.errors import as_coe_error
from coe.serving.api.models import ExpertInfo
from coe.serving.api.service import ROUTED, CoEService
from coe.serving.deployments.spec import ServerSpec, resolve_model, resolve_path, server_id_of

log = logging.getLogger("coe.serving")
_EXPERT = TypeAdapter(Expert)


def parse_expert(data) -> Expert:
    """Validate a registration body (``kind`` defaults to 'lora' when ``adapter`` is given, else 'model')."""
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object describing one expert")
    data = dict(data)
    data.setdefault("kind", "lora" if "adapter" in data else "model")
    try:
        return _EXPERT.validate_python(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "expert")) from None


def check_adapter_root(path: Path, roots: list[Path]) -> None:
    if not any(path == r or r in path.parents for r in roots):
        raise AdapterError(
            f"adapter path {path} is outside the allowed roots; allowed: {available(str(r) for r in roots)}",
            param="adapter",
        )


async def list_experts(service: CoEService) -> list[ExpertInfo]:
    _, states = await service.readiness()
    return [
        ExpertInfo(
            id=e.id, kind=e.kind, source="config" if e.id in service.config_ids else "registry",
            server=server_id_of(e), ready=states.get(e.id) is None, error=states.get(e.id),
            config=e.model_dump(mode="json"),
        )
        for e in service.experts.values()
    ]


async def add_expert(service: CoEService, data) -> ExpertInfo:
    expert = parse_expert(data)
    async with service.admin_lock:
        if expert.id == ROUTED:
            raise InvalidRequestError(f"expert id {ROUTED!r} is reserved for routed requests", param="id")
        if expert.id in service.experts:
            raise DuplicateExpertError(f"expert {expert.id!r} is already registered")
        if expert.fallback is not None and expert.fallback not in service.experts:
            raise InvalidRequestError(
                f"fallback is {expert.fallback!r}; allowed: {available(service.experts)}", param="fallback"
            )
        if isinstance(expert, MixtureExpert):
            raise InvalidRequestError("mixture experts are configured in the config file, not registered at runtime",
                                      param="kind")
        if isinstance(expert, LoraExpert):
            expert = await _add_lora(service, expert)
        else:
            expert = await _add_model(service, expert)
        service.experts[expert.id] = expert
        try:
            service.router.add_expert(expert)
        except Exception:
            service.experts.pop(expert.id, None)
            await _undo(service, expert)
            raise
    log.info("registered expert %s (%s)", expert.id, expert.kind)
    return ExpertInfo(id=expert.id, kind=expert.kind, source="registry", server=server_id_of(expert), ready=True,
                      config=expert.model_dump(mode="json"))


async def _add_lora(service: CoEService, expert: LoraExpert) -> LoraExpert:
    from coe.serving.engines.adapter_check import validate_lora_adapter

    base = service.experts.get(expert.base)
    if not isinstance(base, ModelExpert):
        raise InvalidRequestError(
            f"base is {expert.base!r}; it must name a model expert: {available(service.model_experts())}", param="base"
        )
    path = resolve_path(expert.adapter, service.base_dir)
    roots = [resolve_path(r, service.base_dir) for r in service.config.serving.adapter_roots]
    check_adapter_root(path, roots)
    validate_lora_adapter(path, base.engine.max_lora_rank)
    expert = expert.model_copy(update={"adapter": str(path)})
    sid = server_id_of(expert)
    try:
        await service.backend.add_adapter(sid, expert.id, str(path))
    except Exception as raw:  # noqa: BLE001
        raise (as_coe_error(raw) or raw) from None
    _persist(service, expert)
    return expert


async def _add_model(service: CoEService, expert: ModelExpert) -> ModelExpert:
    if expert.pooled:
        raise InvalidRequestError(
            "pooled experts are set in the config file (the pool is built at start); register with pooled: false "
            "to give this model a deployment of its own", param="pooled",
        )
    path = Path(resolve_model(expert.model, service.base_dir))  # ModelNotFoundError before anything starts
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"model folder {path} has no config.json: not a transformers model folder",
                                 param="model")
    spec = ServerSpec(server_id=server_id_of(expert), host=expert, base_dir=str(service.base_dir) if service.base_dir else None,
                      batching=service.config.serving.batching)
    try:
        await service.backend.add_server(spec)
    except Exception as raw:  # noqa: BLE001
        await service.backend.remove_server(spec.server_id)
        raise (as_coe_error(raw) or raw) from None
    _persist(service, expert)
    return expert


def _persist(service: CoEService, expert: Expert) -> None:
    if service.registry is None:
        return
    try:
        service.registry.add(expert)
    except Exception:
        import asyncio

        asyncio.ensure_future(_undo(service, expert))
        raise


async def _undo(service: CoEService, expert: Expert) -> None:
    try:
        if isinstance(expert, LoraExpert):
            await service.backend.remove_adapter(server_id_of(expert), expert.id)
        else:
            await service.backend.remove_server(server_id_of(expert))
        if service.registry is not None and expert.id in service.registry.ids():
            service.registry.remove(expert.id)
    except Exception:
        log.exception("could not undo the registration of %s", expert.id)


async def remove_expert(service: CoEService, expert_id: str) -> None:
    async with service.admin_lock:
        expert = service.experts.get(expert_id)
        if expert is None:
            raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(service.experts)}")
        if expert_id in service.config_ids:
            raise InvalidRequestError(
                f"expert {expert_id!r} is defined in the config file; remove it there (only registered experts "
                f"can be removed here: {available(set(service.experts) - service.config_ids)})"
            )
        users = sorted(e.id for e in service.experts.values() if getattr(e, "base", None) == expert_id
                       or e.fallback == expert_id)
        if users:
            raise DuplicateExpertError(f"expert {expert_id!r} is used by {', '.join(users)}; remove those first")
        service.router.remove_expert(expert_id)
        service.experts.pop(expert_id)
        if service.registry is not None:
            service.registry.remove(expert_id)
        try:
            if isinstance(expert, LoraExpert):
                await service.backend.remove_adapter(server_id_of(expert), expert_id)
            else:
                await service.backend.remove_server(server_id_of(expert))
        except Exception:
            log.exception("could not unload expert %s", expert_id)
    log.info("removed expert %s", expert_id)
