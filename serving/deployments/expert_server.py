"""The expert server: one engine and every expert it hosts.

A server runs one engine: a ``model`` expert's (together with all LoRA experts on that base,
added at start or at runtime), a ``mixture`` expert's, or the expert pool. Requests are
:class:`~coe.types.Dispatch` es naming their expert (and the LoRA in ``.adapter``, which is the
expert id), so one engine may host several experts, LoRA or whole models alike. The engine is
built with ``engine_cls.from_spec(spec.engine_spec())``. Every request takes one path,
``stream(dispatch)``: checked here, tokenized once by the engine (``Engine.prepare``), then
straight to ``engine.stream`` (each engine batches its own way: continuously, by expert, or in
a window).

This class is plain Python, usable in-process; ``coe.serving.deployments.ray_deployments`` wraps it
as a Ray Serve deployment. Methods are coroutines on one asyncio loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from coe.errors import CoEError, DeadlineExceededError, EngineError, ExpertNotFoundError, available
from coe.serving.deployments.hops import stamp
from coe.serving.deployments.spec import ServerSpec, resolve_path
from coe.types import Dispatch, StreamDelta

log = logging.getLogger("coe.serving")


class ExpertServer:
    """Hosts one engine for the experts of a :class:`ServerSpec`.

    ``engine_cls`` is injected (``coe.serving.engines.get_engine_class(spec.engine_kind)`` when
    None). Engine failures surface as :class:`EngineError` (HTTP 503); request errors (context
    too long, bad adapter) keep their own :class:`CoEError` type.
    """

    def __init__(self, spec: ServerSpec, *, engine_cls=None) -> None:
        self.spec = spec
        self._engine_cls = engine_cls
        self.engine = None
        self._experts: dict[str, str | None] = {}  # expert id -> adapter path (None: the engine's own model)
        # LoRAs registered at runtime, loaded on demand under their adapter_model_id (the
        # deployment's Serve multiplexing decides when; see ray_deployments): name -> path
        self._lazy: dict[str, str] = {}
        self._users: dict[str, int] = {}  # lazy adapter name -> requests using it now
        self._idle = asyncio.Condition()
        self._failed: dict[str, str] = {}  # expert id -> why it cannot serve
        self.load_error: str | None = None
        self.tokens_generated = 0
        self.requests_served = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the engine and the spec's LoRA experts. A LoRA that fails to load marks only that
        expert as failed; an engine that fails marks every expert of the server as failed."""
        spec = self.spec
        host = spec.host
        try:
            engine_cls = self._engine_cls
            if engine_cls is None:
                from coe.serving.engines import get_engine_class

                engine_cls = get_engine_class(spec.engine_kind)
            self.engine = engine_cls.from_spec(spec.engine_spec())
            await self.engine.start()
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            log.exception("expert server %s failed to start", spec.server_id)
            for eid in spec.expert_ids():
                self._failed[eid] = f"the engine of {spec.server_id} failed to load: {self.load_error}"
            return
        self._experts[host.id] = None
        for pooled in spec.pooled:
            self.host_expert(pooled.id)
        if not engine_cls.capabilities.runtime_adapters:
            return
        for lora in spec.loras:
            try:
                await self.add_adapter(lora.id, str(resolve_path(lora.adapter, spec.base_dir)))
            except Exception as err:  # noqa: BLE001
                log.error("LoRA expert %s failed to load: %s", lora.id, err)
                self._failed[lora.id] = f"LoRA expert {lora.id} failed to load: {err}"

    async def stop(self) -> None:
        if self.engine is not None:
            try:
                await self.engine.stop()
            except Exception:
                log.exception("stopping the engine of %s failed", self.spec.server_id)

    def ready(self) -> dict[str, str | None]:
        """Per expert: None when it serves, else why not."""
        out: dict[str, str | None] = {eid: None for eid in self._experts}
        out.update(self._failed)
        return out

    def stats(self) -> dict:
        """Requests and tokens served; ``queue_depth``: requests waiting in the engine's own
        window (the mixture's; 0 for the others); the engine's own stats."""
        engine = self.engine.stats() if self.engine is not None else {}
        return {
            "queue_depth": engine.get("queue_depth", 0),
            "requests": self.requests_served,
            "tokens": self.tokens_generated,
            "engine_running": self.engine.running() if self.engine is not None else None,
            "engine": engine,
        }

    def host_expert(self, expert_id: str) -> None:
        """Answer for another whole-model expert on this engine (for engines hosting several
        models, such as the expert pool, which read ``Dispatch.expert``)."""
        self._experts.setdefault(expert_id, None)

    # ------------------------------------------------------------------ adapters

    def _require_engine(self) -> None:
        """Raise EngineError when this server has no running engine (it failed to load)."""
        if self.engine is None:
            raise EngineError(f"{self.spec.server_id} has no running engine: {self.load_error}")

    async def add_adapter(self, expert_id: str, path: str) -> None:
        """Load a LoRA expert onto the running engine (raises AdapterError, nothing added)."""
        self._require_engine()
        if expert_id in self._experts:
            return
        await self.engine.add_adapter(expert_id, path)
        self._experts[expert_id] = path
        self._failed.pop(expert_id, None)

    async def remove_adapter(self, expert_id: str) -> None:
        """Unload a LoRA expert; one that failed to load (its adapter folder gone) is forgotten too."""
        self._failed.pop(expert_id, None)
        if self._experts.get(expert_id) is None:
            return
        await self.engine.remove_adapter(expert_id)
        self._experts.pop(expert_id, None)

    def pins(self, expert_id: str, adapter_path: str | None) -> bool:
        """Whether ``expert_id`` is loaded under its own id (from the spec, or added) with the same
        adapter ``adapter_path`` (None: any): such requests need no lazily loaded adapter."""
        if expert_id not in self._experts:
            return False
        path = self._experts[expert_id]
        return adapter_path is None or path is None or path == adapter_path

    async def load_lazy(self, name: str, path: str) -> None:
        """Load a runtime-registered LoRA under ``name`` (idempotent; raises AdapterError, nothing added)."""
        self._require_engine()
        if name in self._lazy:
            return
        await self.engine.add_adapter(name, path)
        self._lazy[name] = path
        log.info("%s loaded adapter %s (%d lazily loaded)", self.spec.server_id, name, len(self._lazy))

    async def unload_lazy(self, name: str) -> None:
        """Unload ``name`` once no request uses it (a request that starts meanwhile keeps it)."""
        async with self._idle:
            await self._idle.wait_for(lambda: not self._users.get(name))
            path = self._lazy.pop(name, None)
        if path is not None and self.engine is not None:
            try:
                await self.engine.remove_adapter(name)
                log.info("%s unloaded adapter %s", self.spec.server_id, name)
            except Exception:
                log.exception("unloading adapter %s failed", name)

    async def _use(self, name: str, path: str) -> None:
        if name not in self._lazy:  # evicted between its load and this request: load it again
            await self.load_lazy(name, path)
        self._users[name] = self._users.get(name, 0) + 1

    async def _done(self, name: str) -> None:
        async with self._idle:
            left = self._users.get(name, 1) - 1
            if left:
                self._users[name] = left
            else:
                self._users.pop(name, None)
            self._idle.notify_all()

    def lazy_adapters(self) -> list[str]:
        return list(self._lazy)

    # ------------------------------------------------------------------ requests

    async def _bind(self, dispatch: Dispatch, lazy: str | None) -> Dispatch:
        """``dispatch`` as this server's engine decodes it: tokenized once (``Engine.prepare``: the
        context checked too) and, for a runtime-registered LoRA this replica loaded lazily, under
        that adapter name. Raises EngineError for an expert that failed to load here (a LoRA
        registered again since is served under its new name, ``lazy``: the old failure is not its
        own), ExpertNotFoundError for one this server does not serve, DeadlineExceededError for
        one whose deadline passed while it waited for this server (the ingress has answered it)."""
        if dispatch.deadline is not None and time.time() > dispatch.deadline:
            raise DeadlineExceededError(f"the request's deadline passed before {self.spec.server_id} took it")
        eid = dispatch.expert or self.spec.host.id
        if eid in self._failed and lazy is None:
            raise EngineError(self._failed[eid])
        self._require_engine()
        if lazy is None and eid not in self._experts:
            if dispatch.adapter_path is None:
                raise ExpertNotFoundError(
                    f"expert {eid!r} is not served by {self.spec.server_id}; served: {available(self._experts)}"
                )
            await self.add_adapter(eid, dispatch.adapter_path)  # a replica that missed a runtime registration
        return self.engine.prepare(dataclasses.replace(dispatch, expert=eid, adapter=lazy or dispatch.adapter))

    async def stream(self, dispatch: Dispatch, lazy: str | None = None) -> AsyncIterator[StreamDelta]:
        """Stream ``dispatch``'s answer; errors in the request raise before the first delta. The
        first delta goes at once, later ones joined over ``dispatch.hold_s`` (held deltas of an
        answer that fails go with it). Closing the iterator (the client went away) cancels the
        generation. ``lazy``: the runtime-registered LoRA is served under that adapter name, loaded now if it is not
        (:meth:`load_lazy`), and kept loaded until the stream ends."""
        if lazy is not None:
            await self._use(lazy, dispatch.adapter_path)
        try:
            agen = self.engine.stream(await self._bind(dispatch, lazy))
        except BaseException:
            if lazy is not None:
                await self._done(lazy)
            raise
        stamp("server.prepared", dispatch.request_id)
        first, held, since = True, [], 0.0
        try:
            async for delta in agen:
                if delta.finish_reason is not None:
                    self.requests_served += 1
                    self.tokens_generated += delta.completion_tokens
                if first or dispatch.hold_s <= 0:
                    if first:
                        stamp("server.first", dispatch.request_id)
                        first, since = False, time.monotonic()
                    yield delta
                    continue
                held.append(delta)   # held up to dispatch.hold_s, then sent joined (Dispatch.hold_s)
                now = time.monotonic()
                if delta.finish_reason is not None or now - since >= dispatch.hold_s:
                    yield StreamDelta.join(held)
                    held, since = [], now
            if held:   # an engine stream that ended without a finish reason
                yield StreamDelta.join(held)
        except (CoEError, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as err:
            log.exception("engine of %s failed while streaming", self.spec.server_id)
            raise EngineError(f"the engine of expert {dispatch.expert!r} failed: {type(err).__name__}: {err}") from None
        finally:
            await agen.aclose()
            if lazy is not None:
                await self._done(lazy)
