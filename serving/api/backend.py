"""Where the ingress sends generations: expert servers in-process or as Ray Serve deployments.

:class:`Backend` is the small protocol the ingress logic (:class:`coe.serving.api.service.CoEService`)
talks to: one call per generation, ``stream(dispatch)`` (the expert server is ``dispatch.server_id``); :class:`LocalBackend` hosts :class:`ExpertServer` objects in the same process (tests,
benchmarks of the bare logic); ``coe.serving.deployments.ray_deployments.ServeBackend`` calls Ray
Serve deployment handles. Both raise the servers' :class:`coe.errors.CoEError` s unchanged
(the Ray one after unwrapping).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from coe.errors import EngineError, ServerDownError, available
from coe.serving.deployments.expert_server import ExpertServer
from coe.serving.deployments.spec import ServerSpec
from coe.types import Dispatch, StreamDelta


class Backend(Protocol):
    def stream(self, dispatch: Dispatch) -> AsyncIterator[StreamDelta]:
        """The answer of ``dispatch`` from its server, delta by delta (the last one carries the
        finish reason and usage); closing it cancels the generation."""

    async def add_adapter(self, server_id: str, expert_id: str, path: str) -> None: ...

    async def remove_adapter(self, server_id: str, expert_id: str, path: str | None = None) -> None: ...

    def attach_server(self, spec: ServerSpec) -> None:
        """Serve a model expert whose server another ingress replica started (registry sync)."""

    def detach_server(self, server_id: str) -> None:
        """Forget a server another ingress replica stopped (registry sync)."""

    async def add_server(self, spec: ServerSpec) -> None:
        """Start a server for a new model expert; raises (and leaves nothing behind) when its
        engine fails to load."""

    async def remove_server(self, server_id: str) -> None: ...

    async def ready(self) -> dict[str, str | None]:
        """Per expert id: None when it serves, else why not (an expert absent is not ready)."""

    async def stats(self) -> dict[str, dict]: ...


class LocalBackend:
    """Expert servers in this process. ``engine_cls_for(spec)`` picks each server's engine
    class (None: the registered one for ``spec.engine_kind``)."""

    def __init__(self, specs: dict[str, ServerSpec], *, engine_cls_for=None) -> None:
        self._engine_cls_for = engine_cls_for or (lambda spec: None)
        self.servers: dict[str, ExpertServer] = {
            sid: ExpertServer(spec, engine_cls=self._engine_cls_for(spec)) for sid, spec in specs.items()
        }

    async def start(self) -> None:
        for server in self.servers.values():
            await server.start()

    async def stop(self) -> None:
        for server in self.servers.values():
            await server.stop()

    def _server(self, server_id: str) -> ExpertServer:
        try:
            return self.servers[server_id]
        except KeyError:
            raise ServerDownError(f"no expert server {server_id!r}; running: {available(self.servers)}") from None

    async def stream(self, dispatch):
        agen = self._server(dispatch.server_id).stream(dispatch)
        try:
            async for delta in agen:
                yield delta
        finally:
            await agen.aclose()

    async def add_adapter(self, server_id, expert_id, path):
        await self._server(server_id).add_adapter(expert_id, path)

    async def remove_adapter(self, server_id, expert_id, path=None):
        await self._server(server_id).remove_adapter(expert_id)

    def attach_server(self, spec: ServerSpec) -> None:
        if spec.server_id not in self.servers:  # in-process, every "replica" shares these servers
            raise ServerDownError(f"no expert server {spec.server_id!r}; running: {available(self.servers)}")

    def detach_server(self, server_id: str) -> None:
        pass

    async def add_server(self, spec: ServerSpec) -> None:
        server = ExpertServer(spec, engine_cls=self._engine_cls_for(spec))
        await server.start()
        if server.load_error is not None:
            await server.stop()
            raise EngineError(server.ready()[spec.host.id] or f"the engine of {spec.host.id} failed to load")
        self.servers[spec.server_id] = server

    async def remove_server(self, server_id):
        server = self.servers.pop(server_id, None)
        if server is not None:
            await server.stop()

    async def ready(self):
        out: dict[str, str | None] = {}
        for server in self.servers.values():
            out.update(server.ready())
        return out

    async def stats(self):
        return {sid: s.stats() for sid, s in self.servers.items()}
