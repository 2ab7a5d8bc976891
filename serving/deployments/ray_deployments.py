"""The Ray Serve side: the expert-server deployment and the handle-based backend.

Imported only when an application is built or runs on Ray (it imports ``ray.serve``).
Model experts registered at runtime get their own Serve application
(``coe-expert-<id>``, no HTTP route) holding one :class:`ExpertServerDeployment`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from ray import serve

from coe.config import ResourcesConfig
from coe.errors import (
    CoEError,
    EngineError,
    OverloadedError,
    ReplicaLostError,
    ServerDownError,
    available,
)
from coe.serving.deployments.capacity import check_capacity
from coe.serving.deployments.expert_server import ExpertServer
from coe.serving.deployments.hops import stamp
from coe.serving.deployments.memtrace import MemTrace, frames_from_env, memory_report
from coe.serving.deployments.spec import SERVE_ENV, ServerSpec, adapter_model_id

log = logging.getLogger("coe.serving")
RUNTIME_APP_PREFIX = "coe-expert-"


def lower_priority(increment: int) -> None:
    """Add ``increment`` to the niceness of every thread of this process (at most 19).

    Linux keeps a niceness per thread and ``os.nice`` changes only the calling one (a replica's
    constructor runs on Serve's event-loop thread, not the main one); threads and processes
    started afterwards inherit their creator's. Elsewhere, ``os.nice``.
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        os.nice(increment)
        return
    for tid in (int(t.name) for t in tasks.iterdir()):
        with contextlib.suppress(ProcessLookupError):   # a thread that ended meanwhile
            now = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, now + increment))


@contextlib.contextmanager
def serve_log_targets_kept(logger_name: str = "ray.serve"):
    """Give Serve's buffering log handlers back the targets that a ``logging.config.dictConfig``
    inside the block took away.

    vLLM configures logging with ``dictConfig`` when its engine is built, which closes every
    existing handler: the replica's ``MemoryHandler`` then has no file to flush to and keeps
    every later record (its access log line per request, ~1.5 KiB each) for the life of the
    replica, and the replica's Serve log file stops. A closed file handler reopens on its next
    record."""
    from logging.handlers import MemoryHandler

    kept = [(h, h.target) for h in logging.getLogger(logger_name).handlers if isinstance(h, MemoryHandler)]
    try:
        yield
    finally:
        for handler, target in kept:
            if handler.target is None and target is not None:
                handler.setTarget(target)
                handler.flush()


@serve.deployment(max_ongoing_requests=256, health_check_period_s=10, graceful_shutdown_timeout_s=5)
class ExpertServerDeployment:
    """One replica: an :class:`ExpertServer` whose engine loads in the constructor."""

    async def __init__(self, spec: ServerSpec) -> None:
        logging.basicConfig(level=logging.INFO)
        frames = frames_from_env()   # COE_TRACEMALLOC, checked before the engine loads
        nice = spec.model_expert.engine.nice if spec.model_expert is not None else 0
        if nice:
            lower_priority(nice)   # this replica and the engine processes it starts (routing runs first)
        self.server = ExpertServer(spec)
        self._paths: dict[str, str] = {}  # multiplexed model id -> adapter path (of the request that named it)
        # the configured LRU bound (the class-level decorator below only marks the deployment as multiplexed)
        async def load(model_id: str) -> _Resident:  # a plain function: Serve keeps its LRU on it
            return await self._load(model_id)

        self._load_adapter = serve.multiplexed(max_num_models_per_replica=spec.max_adapters)(load)
        with serve_log_targets_kept():   # the engine may configure logging (vLLM does)
            await self.server.start()
        self.memtrace = MemTrace.of(frames)   # traced from here on (off: None)

    @serve.multiplexed(max_num_models_per_replica=8)
    async def _load_adapter(self, model_id: str):  # replaced per replica in __init__
        return await self._load(model_id)

    async def _load(self, model_id: str) -> _Resident:
        await self.server.load_lazy(model_id, self._paths[model_id])
        return _Resident(self.server, model_id)

    async def _lazy(self, dispatch) -> str | None:
        """The adapter name a runtime-registered LoRA is served under on this replica (loaded
        through Serve multiplexing, LRU-bounded), or None when the server hosts it itself."""
        model_id = serve.get_multiplexed_model_id()
        path = dispatch.adapter_path
        if not model_id or path is None or self.server.pins(dispatch.expert, path):
            return None
        self._paths[model_id] = path
        await self._load_adapter(model_id)
        return model_id

    async def stream(self, dispatch):
        """The one call: :meth:`ExpertServer.stream` of ``dispatch`` (a :class:`~coe.types.Dispatch`)."""
        stamp("replica.enter", dispatch.request_id)
        agen = self.server.stream(dispatch, await self._lazy(dispatch))
        try:
            async for delta in agen:
                yield delta
        finally:
            await agen.aclose()

    async def add_adapter(self, expert_id: str, path: str) -> None:
        """Load a LoRA registered at runtime (called with its multiplexed model id: it stays in
        this replica's LRU) or, without one, under its own id."""
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            self._paths[model_id] = path
            await self._load_adapter(model_id)
        else:
            await self.server.add_adapter(expert_id, path)

    async def remove_adapter(self, expert_id: str) -> None:
        model_id = serve.get_multiplexed_model_id()
        if model_id:
            await self.server.unload_lazy(model_id)  # Serve's LRU reloads it if it is ever asked for again
        await self.server.remove_adapter(expert_id)

    async def lazy_adapters(self) -> list[str]:
        return self.server.lazy_adapters()

    async def ready(self) -> dict[str, str | None]:
        return self.server.ready()

    async def stats(self) -> dict:
        return {**self.server.stats(), "nice": os.getpriority(os.PRIO_PROCESS, 0)}   # this thread's niceness

    async def memory_diff(self, limit: int = 20) -> dict:
        """This replica's RSS and, under ``COE_TRACEMALLOC``, its heap diff (serving/deployments/memtrace.py)."""
        return memory_report(self.memtrace, limit)

    async def check_health(self) -> None:
        """Fail (Serve restarts the replica) only when a loaded engine stops being healthy; an
        engine that never loaded is reported by /readyz and 503s instead: restarting would not
        fix a broken model reference, and the other experts must keep serving."""
        engine = self.server.engine
        if self.server.load_error is None and engine is not None and not await engine.healthy():
            raise RuntimeError(f"the engine of {self.server.spec.server_id} is not healthy")

    async def __del__(self) -> None:
        await self.server.stop()


class _Resident:
    """A lazily loaded adapter as Serve's multiplexing LRU holds it: evicting it unloads it from
    the engine once no request uses it. (Serve calls ``__del__`` in a thread on eviction; the
    unload runs on the replica's loop.)"""

    def __init__(self, server: ExpertServer, name: str) -> None:
        self.server, self.name = server, name
        self.loop = asyncio.get_running_loop()
        self.evicted = False

    def __del__(self) -> None:
        if self.evicted:
            return
        self.evicted = True
        try:
            asyncio.run_coroutine_threadsafe(self.server.unload_lazy(self.name), self.loop)
        except RuntimeError:  # the loop is closed: the replica is stopping
            pass


def deployment_options(spec: ServerSpec) -> dict:
    """Ray Serve options from the spec's ResourcesConfig (CPUs, GPUs, memory, replicas, autoscaling)."""
    return serve_options(spec.server_id, spec.resources)


def serve_options(name: str, res: ResourcesConfig, env: dict[str, str] | None = None) -> dict:
    """Ray Serve options of the deployment ``name``: ``res``'s resources and replicas, and
    :data:`SERVE_ENV` and ``env`` in the replicas' environment (Ray merges it into the job's; a
    replica's process starts with it)."""
    actor = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus,
             "runtime_env": {"env_vars": {**SERVE_ENV, **(env or {})}}}
    if res.memory_gib:
        actor["memory"] = int(res.memory_gib * 2**30)
    opts: dict = {"name": name, "ray_actor_options": actor}
    if res.autoscaling is not None:
        a = res.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
        }
    else:
        opts["num_replicas"] = res.num_replicas
    return opts


def bind_server(spec: ServerSpec):
    return ExpertServerDeployment.options(**deployment_options(spec)).bind(spec)


def map_ray_error(err: BaseException, server_id: str) -> BaseException:
    """The domain error for an exception out of a Serve handle call to ``server_id``, by type.

    A replica's own :class:`CoEError` (wrapped in ``RayTaskError``) comes back unwrapped; a
    replica that died, is restarting or cannot be placed is :class:`ServerDownError` (fail fast,
    ``Retry-After``); Serve's back-pressure is :class:`OverloadedError` (429); any other Ray error
    is :class:`EngineError`. Ray's text (pids, IP addresses, actor ids) is logged, never put in
    the message. Anything else (including cancellation) is returned unchanged."""
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    if isinstance(err, rex.RayTaskError):
        cause = err.cause
        if isinstance(cause, CoEError):
            return cause
    if isinstance(err, CoEError) and not isinstance(err, rex.RayError):
        return err
    if isinstance(err, sex.BackPressureError):
        return OverloadedError(f"expert server {server_id} is at capacity; retry later", retry_after_s=1.0)
    if isinstance(err, (rex.RayActorError, rex.ActorUnschedulableError, rex.WorkerCrashedError, rex.NodeDiedError,
                        rex.LocalRayletDiedError, rex.RaySystemError, sex.DeploymentUnavailableError,
                        sex.ReplicaUnavailableError)):
        log.warning("expert server %s is unreachable: %s: %s", server_id, type(err).__name__, err)
        return ServerDownError(f"expert server {server_id} is down or restarting")
    if isinstance(err, (rex.RayError, sex.RayServeException)):
        log.error("expert server %s failed: %s: %s", server_id, type(err).__name__, err)
        return EngineError(f"expert server {server_id} failed on the request")
    return err


class ServeBackend:
    """:class:`coe.serving.api.backend.Backend` over Ray Serve deployment handles. Raises only
    domain errors (:func:`map_ray_error`); cancelling a call cancels it on the replica."""

    def __init__(self, handles: dict, *, load_timeout_s: float = 600, replicas: dict[str, int] | None = None) -> None:
        self.handles = dict(handles)
        self.load_timeout_s = load_timeout_s
        self.replicas = dict(replicas or {})  # server id -> most replicas it may have (1 when absent)
        # (server id, LoRA expert id and adapter path or None) -> (the server's handle, its streaming handle):
        # built once, not per request; rebuilt when the server's handle changes
        self._streaming: dict[tuple[str, str | None, str | None], tuple[object, object]] = {}

    def _error(self, err: BaseException, server_id: str) -> BaseException:
        """:func:`map_ray_error`, except that the death of one replica of a server that has
        several is :class:`ReplicaLostError` (the server is not marked down)."""
        from ray import exceptions as rex
        from ray.serve import exceptions as sex

        mapped = map_ray_error(err, server_id)
        if isinstance(mapped, ServerDownError) and self.replicas.get(server_id, 1) > 1 \
                and isinstance(err, (rex.RayActorError, sex.ReplicaUnavailableError)):
            return ReplicaLostError(f"a replica of expert server {server_id} died with the request",
                                    retry_after_s=1.0)
        return mapped

    def _handle(self, server_id: str):
        try:
            return self.handles[server_id]
        except KeyError:
            raise ServerDownError(f"no expert server {server_id!r}; running: {available(self.handles)}") from None

    def _handle_for(self, server_id: str, expert_id: str | None, adapter_path: str | None):
        """The server's handle; for a LoRA expert with its multiplexed model id, so Serve sends
        the request to a replica that has the adapter loaded when there is one."""
        handle = self._handle(server_id)
        if expert_id is None or adapter_path is None:
            return handle
        return handle.options(multiplexed_model_id=adapter_model_id(expert_id, adapter_path))

    def _stream_handle(self, dispatch):
        """The streaming handle (``stream=True``, by value, the multiplexed model id of a LoRA
        expert) for ``dispatch``'s server and adapter, made once per server and adapter."""
        handle = self._handle(dispatch.server_id)
        lora = dispatch.expert is not None and dispatch.adapter_path is not None
        key = (dispatch.server_id, dispatch.expert, dispatch.adapter_path) if lora else (dispatch.server_id, None, None)
        cached = self._streaming.get(key)
        if cached is not None and cached[0] is handle:
            return cached[1]
        # by value: the request and each stream item go over the replica's own gRPC server instead
        # of Ray's object protocol (an ObjectRef per item, reported to the owner and then fetched);
        # an item back to the ingress takes ~0.7 ms instead of ~2 ms
        options = {"stream": True, "_by_reference": False}
        if lora:
            options["multiplexed_model_id"] = adapter_model_id(dispatch.expert, dispatch.adapter_path)
        streaming = handle.options(**options)
        self._streaming[key] = (handle, streaming)
        return streaming

    def _forget(self, server_id: str) -> None:
        self.handles.pop(server_id, None)
        for key in [k for k in self._streaming if k[0] == server_id]:
            del self._streaming[key]

    async def _call(self, server_id: str, method: str, *args, handle=None):
        response = getattr(handle or self._handle(server_id), method).remote(*args)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the client went away or the deadline passed: stop the replica's work
            raise
        except Exception as err:  # noqa: BLE001
            raise self._error(err, server_id) from None

    async def stream(self, dispatch):
        stamp("backend.call", dispatch.request_id)
        gen = self._stream_handle(dispatch).stream.remote(dispatch)
        done, first = False, True
        try:
            try:
                async for delta in gen:
                    stamp("backend.first" if first else "backend.item", dispatch.request_id)
                    first = False
                    yield delta
            except Exception as err:  # noqa: BLE001
                raise self._error(err, dispatch.server_id) from None
            done = True
        finally:
            if not done:
                gen.cancel()  # the client went away (or failed): stop generating

    async def add_adapter(self, server_id, expert_id, path):
        """Load the LoRA on one replica (the others load it on their first request for it)."""
        await self._call(server_id, "add_adapter", expert_id, path, handle=self._handle_for(server_id, expert_id, path))

    async def remove_adapter(self, server_id, expert_id, path=None):
        """Unload the LoRA from a replica holding it; on the others it is never asked for again
        and leaves their LRU (an expert registered again gets a new model id: new weights)."""
        await self._call(server_id, "remove_adapter", expert_id, handle=self._handle_for(server_id, expert_id, path))

    def attach_server(self, spec: ServerSpec) -> None:
        """Serve a model expert another ingress replica registered (its Serve application runs)."""
        self.attach_runtime_servers({spec.server_id: spec})

    def detach_server(self, server_id: str) -> None:
        """Forget a model expert another ingress replica removed (it deleted the application)."""
        self._forget(server_id)

    async def add_server(self, spec: ServerSpec) -> None:
        """Deploy ``spec`` as its own Serve application and wait for its engine."""
        app_name = RUNTIME_APP_PREFIX + spec.host.id
        await asyncio.to_thread(check_capacity, [spec])  # a model that cannot be placed: 503 naming what is missing
        # deploy without waiting inside Serve: the wait below has a deadline (a replica that
        # never fits the cluster's free resources must not hang the admin call)
        await asyncio.to_thread(serve._run, bind_server(spec), name=app_name, route_prefix=None, _blocking=False)
        handle = serve.get_deployment_handle(spec.server_id, app_name=app_name)
        try:
            states = await asyncio.wait_for(handle.ready.remote(), timeout=self.load_timeout_s)
        except TimeoutError:
            res = spec.resources
            raise EngineError(
                f"the engine of {spec.host.id} did not start within {self.load_timeout_s:.0f} s; does the cluster "
                f"have num_cpus={res.num_cpus}, num_gpus={res.num_gpus} free for it?"
            ) from None
        if states.get(spec.host.id) is not None:
            raise EngineError(states[spec.host.id])
        self.handles[spec.server_id] = handle

    async def remove_server(self, server_id: str) -> None:
        self._forget(server_id)
        app_name = RUNTIME_APP_PREFIX + server_id.removeprefix("expert-")
        try:
            await asyncio.to_thread(serve.delete, app_name)
        except Exception:
            log.exception("could not delete Serve application %s", app_name)

    def attach_runtime_servers(self, specs: dict[str, ServerSpec]) -> None:
        """Find the Serve applications of runtime-registered models missing from the handles."""
        for sid, spec in specs.items():
            if sid not in self.handles:
                self.handles[sid] = serve.get_deployment_handle(sid, app_name=RUNTIME_APP_PREFIX + spec.host.id)

    async def ready(self):
        out: dict[str, str | None] = {}

        async def one(sid, handle):
            try:
                out.update(await asyncio.wait_for(handle.ready.remote(), timeout=5))
            except Exception as err:  # noqa: BLE001
                log.warning("expert server %s did not answer readiness: %s", sid, map_ray_error(err, sid))

        await asyncio.gather(*(one(sid, h) for sid, h in self.handles.items()))
        return out

    async def stats(self):
        out = {}
        for sid, h in self.handles.items():
            try:
                out[sid] = await asyncio.wait_for(h.stats.remote(), timeout=5)
            except Exception:  # noqa: BLE001
                out[sid] = {}
        return out
