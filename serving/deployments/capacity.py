"""Does a deployment plan fit the Ray cluster? Checked before deploying, so a plan that cannot be
placed fails at once with a message instead of waiting forever for resources.

A plan is a list of :class:`Demand` (one per deployment: replicas x per-replica CPUs, GPUs and
memory, in Ray's resource names). :func:`unplaced` packs the replicas onto the nodes' free
resources (first fit, largest first: a replica must fit on one node); :func:`check_capacity`
reads the free resources of the connected cluster and raises :class:`coe.errors.CapacityError`
(HTTP 503) naming the demand per deployment, the supply and what is missing.

Clusters that add nodes on demand (the Ray autoscaler, KubeRay with autoscaling) can place what
does not fit now: skip the check there (``coe serve --no-capacity-check``).
Only :func:`cluster_free` and :func:`check_capacity` (without ``nodes``) talk to Ray; they need a
connected ``ray``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from coe.config import CoEConfig, ResourcesConfig
from coe.errors import CapacityError

GIB = 2**30
# the Ray resource names a deployment can ask for, in the order messages list them
KINDS = ("CPU", "GPU", "memory")


@dataclass(frozen=True)
class Demand:
    """One deployment's ask: ``replicas`` replicas of ``per_replica`` (Ray resource names)."""

    name: str
    replicas: int
    per_replica: dict[str, float] = field(default_factory=dict)

    def total(self) -> dict[str, float]:
        return {k: v * self.replicas for k, v in self.per_replica.items()}


def demand_of(name: str, res: ResourcesConfig) -> Demand:
    """The demand of one deployment with these resources. An autoscaled deployment starts with
    ``min_replicas`` (at least one: Serve starts one to become ready)."""
    per = {"CPU": float(res.num_cpus), "GPU": float(res.num_gpus)}
    if res.memory_gib:
        per["memory"] = float(res.memory_gib) * GIB
    replicas = max(1, res.autoscaling.min_replicas) if res.autoscaling is not None else res.num_replicas
    return Demand(name, replicas, {k: v for k, v in per.items() if v > 0})


def plan_demand(config: CoEConfig, specs: Iterable) -> list[Demand]:
    """The ingress plus one demand per expert server (``specs``: :class:`ServerSpec` objects)."""
    return [demand_of("coe-ingress", config.serving.ingress)] + [demand_of(s.server_id, s.resources) for s in specs]


def unplaced(demands: list[Demand], nodes: list[dict[str, float]]) -> list[str]:
    """Names of the deployments with a replica that does not fit the nodes' free resources
    (``nodes``: one dict of free Ray resources per node; not modified). Replicas are packed
    largest first (GPU, then CPU, then memory), each onto the first node that holds it whole."""
    free = [dict(n) for n in nodes]
    replicas = [(d.name, d.per_replica) for d in demands for _ in range(d.replicas)]
    replicas.sort(key=lambda r: tuple(-r[1].get(k, 0.0) for k in KINDS))
    missing: list[str] = []
    for name, need in replicas:
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            if name not in missing:
                missing.append(name)
    return missing


def _fmt(resources: dict[str, float]) -> str:
    parts = []
    for k in KINDS:
        v = resources.get(k, 0.0)
        if k == "memory":
            if v > 0:
                parts.append(f"memory {v / GIB:.1f} GiB")
        elif v > 0 or k == "CPU":
            parts.append(f"{k} {v:g}")
    return ", ".join(parts)


def shortfall(demands: list[Demand], nodes: list[dict[str, float]]) -> dict[str, float]:
    """Per resource kind, how much more the plan needs than the nodes have free in all (> 0 only)."""
    out = {}
    for k in KINDS:
        need = sum(d.total().get(k, 0.0) for d in demands)
        have = sum(n.get(k, 0.0) for n in nodes)
        if need > have + 1e-9:
            out[k] = need - have
    return out


def capacity_message(demands: list[Demand], nodes: list[dict[str, float]], missing: list[str]) -> str:
    """What does not fit: the deployments that cannot be placed, what is missing, the demand per
    deployment and the free supply per node."""
    asked = "; ".join(f"{d.name}: {d.replicas} x ({_fmt(d.per_replica)})" for d in demands)
    total: dict[str, float] = {}
    for d in demands:
        for k, v in d.total().items():
            total[k] = total.get(k, 0.0) + v
    supply = "; ".join(f"node {i}: {_fmt(n)}" for i, n in enumerate(nodes)) or "no nodes"
    short = shortfall(demands, nodes)
    why = (f"missing {_fmt(short)}" if short else
           "enough in total but no single node has room for a whole replica")
    return (f"not enough free cluster resources for {', '.join(missing)} ({why}). Demand per deployment: {asked} "
            f"(total {_fmt(total)}). Free: {supply}. Lower the resources of the experts, remove some, or add "
            f"capacity (coe serve --num-cpus / a bigger cluster).")


def cluster_free() -> list[dict[str, float]]:
    """The free Ray resources of each live node of the connected cluster (CPU, GPU, memory)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node  # DeveloperAPI: per-node view

        per_node = list(available_resources_per_node().values())
    except Exception:  # noqa: BLE001  (an older or newer Ray: fall back to the cluster-wide sum)
        per_node = [ray.available_resources()]
    return [{k: float(n.get(k, 0.0)) for k in KINDS} for n in per_node]


def check_capacity(demands: Iterable, *, nodes: list[dict[str, float]] | None = None) -> None:
    """Raise :class:`CapacityError` (503) when ``demands`` do not fit ``nodes`` (default: the
    connected cluster's free resources, :func:`cluster_free`). ``demands`` holds :class:`Demand`
    objects or :class:`ServerSpec` objects (an expert server about to be deployed), e.g.
    ``check_capacity([spec])`` before a runtime registration deploys a new model server."""
    items = [d if isinstance(d, Demand) else demand_of(d.server_id, d.resources) for d in demands]
    if nodes is None:
        nodes = cluster_free()
    missing = unplaced(items, nodes)
    if missing:
        raise CapacityError(capacity_message(items, nodes, missing))
