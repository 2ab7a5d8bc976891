"""Runtime expert registration: ``/v1/experts`` GET/POST/DELETE.

Registering is all-or-nothing: the body is validated, a LoRA's folder must lie under one of
``serving.adapter_roots`` and be a PEFT LoRA of a rank the base engine accepts, and it must load
on the base's running engine; a model must resolve and its new server must start. Only then is
the expert written to the registry and handed to the router. Any failure undoes what was done
and raises (400/404/409/503), so nothing half-registered remains.

A body may carry ``profile: {probe, budget, kind, max_tokens, strategy, stop_when}``: it is
checked with the rest (400 naming the field, e.g. ``profile.strategy``), and once the expert is
registered its profile starts in the background (``serving/api/profiles.py``); the registration
does not wait for it.
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
from coe.registry import with_registration_defaults
from coe.serving.api.errors import as_coe_error
from coe.serving.api.models import ExpertInfo
from coe.serving.api.profiles import ProfileJobs
from coe.serving.api.service import ROUTED, CoEService
from coe.serving.api.validation import check_text
from coe.serving.deployments.spec import ServerSpec, resolve_model, resolve_path, server_id_of

log = logging.getLogger("coe.serving")
_EXPERT = TypeAdapter(Expert)


def parse_expert(data) -> Expert:
    """Validate a registration body (``kind`` defaults to 'lora' when ``adapter`` is given, else 'model').

    Text must be valid Unicode and free of NUL characters (they end up in file paths): 400 naming
    the field otherwise."""
    if not isinstance(data, dict):
        raise InvalidRequestError("the body must be a JSON object describing one expert")
    check_text(data, allow_nul=False)
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


async def list_experts(service: CoEService, profiles: ProfileJobs) -> list[ExpertInfo]:
    """Every live expert with its state; an unavailable one (its server failed to load it) with
    the reason and what to do about it."""
    _, states = await service.readiness()
    catalog = service.catalog
    jobs = profiles.statuses()
    out = []
    for e in catalog.snapshot().values():
        why, source = states.get(e.id), "config" if e.id in catalog.config_ids else "registry"
        unavailable = why is not None and catalog.health.unavailable(e.id) is not None
        if unavailable:
            why += ("; fix the config file (or restore what it names) and restart the service" if source == "config"
                    else f"; restore it and restart the service, or remove the expert: DELETE /v1/experts/{e.id} "
                    f"(`coe experts remove {e.id}`)")
        state = "ready" if why is None else "unavailable" if unavailable else "not_ready"
        out.append(ExpertInfo(id=e.id, kind=e.kind, source=source, server=server_id_of(e), ready=why is None,
                              state=state, error=why, config=e.model_dump(mode="json"), profile=jobs.get(e.id)))
    return out


async def get_expert(service: CoEService, profiles: ProfileJobs, expert_id: str) -> ExpertInfo:
    """One expert with its profile's progress; 404 for an unknown id."""
    if expert_id not in service.catalog:
        raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(service.catalog.ids())}")
    return next(e for e in await list_experts(service, profiles) if e.id == expert_id)


async def start_profile(service: CoEService, profiles: ProfileJobs, expert_id: str, body):
    """(Re)start the profile of a live expert: 404 unknown, 409 still running, 400 bad body."""
    expert = service.catalog.get(expert_id)
    if expert is None:
        raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(service.catalog.ids())}")
    req, probes = profiles.prepare(expert, body)
    return profiles.start(expert_id, req, probes)


async def add_expert(service: CoEService, data, profiles: ProfileJobs) -> ExpertInfo:
    profile = data.pop("profile", None) if isinstance(data, dict) else None
    expert = parse_expert(data)
    catalog = service.catalog
    prepared = profiles.prepare(expert, profile) if profile is not None else None
    async with service.admin_lock:
        if expert.id == ROUTED:
            raise InvalidRequestError(f"expert id {ROUTED!r} is reserved for routed requests", param="id")
        if expert.id in catalog:
            raise DuplicateExpertError(f"expert {expert.id!r} is already registered")
        if expert.fallback is not None and expert.fallback not in catalog:
            raise InvalidRequestError(
                f"fallback is {expert.fallback!r}; allowed: {available(catalog.ids())}", param="fallback"
            )
        if isinstance(expert, MixtureExpert):
            raise InvalidRequestError("mixture experts are configured in the config file, not registered at runtime",
                                      param="kind")
        if isinstance(expert, LoraExpert):
            expert = await _add_lora(service, expert)
        else:
            expert = await _add_model(service, expert)
        try:
            catalog.add(expert)  # registry + router + live set, all or nothing
        except Exception as raw:  # noqa: BLE001  (undo the load, then report)
            await _unload(service, expert)
            raise (as_coe_error(raw) or raw) from None
    log.info("registered expert %s (%s)", expert.id, expert.kind)
    job = None
    if prepared is not None:
        try:
            job = profiles.start(expert.id, *prepared)
        except Exception as raw:  # noqa: BLE001  (registered all the same: routed by its description)
            log.warning("the profile of %s could not start: %s", expert.id, raw)
    return ExpertInfo(id=expert.id, kind=expert.kind, source="registry", server=server_id_of(expert), ready=True,
                      config=expert.model_dump(mode="json"), profile=job)


async def _add_lora(service: CoEService, expert: LoraExpert) -> LoraExpert:
    """Validate and load the adapter on its base's server (nothing is left loaded on failure)."""
    from coe.serving.engines.adapter_check import validate_lora_adapter

    base = service.catalog.get(expert.base)
    if not isinstance(base, ModelExpert):
        raise InvalidRequestError(
            f"base is {expert.base!r}; it must name a model expert: {available(service.catalog.model_experts())}",
            param="base",
        )
    path = resolve_path(expert.adapter, service.base_dir)
    roots = [resolve_path(r, service.base_dir) for r in service.config.serving.adapter_roots]
    check_adapter_root(path, roots)
    validate_lora_adapter(path, base.engine.max_lora_rank)
    expert = expert.model_copy(update={"adapter": str(path)})
    try:
        await service.backend.add_adapter(server_id_of(expert), expert.id, str(path))
    except Exception as raw:  # noqa: BLE001
        raise (as_coe_error(raw) or raw) from None
    return expert


async def _add_model(service: CoEService, expert: ModelExpert) -> ModelExpert:
    """Resolve the model and start its server (nothing is left running on failure). A model that
    gives no ``resources`` gets ``serving.registered_model_resources`` (a GPU on a GPU cluster)."""
    expert = with_registration_defaults(expert, service.config)
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
    return expert


async def _unload(service: CoEService, expert: Expert) -> None:
    """Take ``expert`` off its server (the backend side of a registration); logs failures."""
    try:
        if isinstance(expert, LoraExpert):
            await service.backend.remove_adapter(server_id_of(expert), expert.id, expert.adapter)
        else:
            await service.backend.remove_server(server_id_of(expert))
    except Exception:
        log.exception("could not unload expert %s", expert.id)


async def remove_expert(service: CoEService, expert_id: str, profiles: ProfileJobs) -> None:
    catalog = service.catalog
    async with service.admin_lock:
        if expert_id not in catalog:
            raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(catalog.ids())}")
        if expert_id in catalog.config_ids:
            raise InvalidRequestError(
                f"expert {expert_id!r} is defined in the config file; remove it there (only registered experts "
                f"can be removed here: {available(set(catalog.ids()) - catalog.config_ids)})"
            )
        users = catalog.users_of(expert_id)
        if users:
            raise DuplicateExpertError(f"expert {expert_id!r} is used by {', '.join(users)}; remove those first")
        await profiles.cancel(expert_id)
        expert = catalog.remove(expert_id)   # the registry forgets its profile and outcomes too
        await _unload(service, expert)
    await profiles.refresh()
    log.info("removed expert %s", expert_id)
