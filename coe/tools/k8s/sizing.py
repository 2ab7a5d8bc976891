"""From the config's per-deployment resources to KubeRay worker-group sizes.

Every Serve deployment the builder (``coe.serving.app:app_builder``) creates from the config is
a :class:`Unit`: the ingress (``serving.ingress``; it hosts the router and its embedder) and
one expert server per ``model`` expert (its engine hosts its LoRA experts) and per ``mixture``
expert. The builder gives each deployment these same resources as Ray actor options and
autoscaling bounds (``coe.serving.deployments.ray_deployments.serve_options``), so the pods only
have to offer them. Units that ask for GPUs go to the GPU group, the rest to the CPU group.

A group's pods all have one shape (:class:`PodShape`). ``minReplicas`` (and the initial
``replicas``) is the total demand at every unit's minimum replica count divided by the pod
shape, rounded up; ``maxReplicas`` is a bound with no packing luck: every unit's maximum
replicas packed on pods of its own, plus ``spare`` pods for base models registered at
runtime. The Ray autoscaler (``enableInTreeAutoscaling``) moves between the two as Serve
autoscaling asks for replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from coe.config import CoEConfig, ResourcesConfig

DEFAULT_MEMORY_GIB = {"ingress": 2.0, "expert": 4.0}
"""Memory assumed per replica when the config sets no ``memory_gib`` (pod sizing only)."""
POD_OVERHEAD_CPUS = 1
"""CPUs a pod keeps beyond its replicas: raylet, the node's Serve proxy, the dashboard agent."""
POD_OVERHEAD_GIB = 2


@dataclass(frozen=True)
class Unit:
    """One Serve deployment's per-replica demand and replica bounds."""

    name: str
    role: str  # ingress | expert
    cpus: float
    gpus: float
    memory_gib: float | None
    min_replicas: int
    max_replicas: int

    @classmethod
    def of(cls, name: str, role: str, r: ResourcesConfig) -> Unit:
        if r.autoscaling is not None:
            lo, hi = r.autoscaling.min_replicas, r.autoscaling.max_replicas
        else:
            lo = hi = r.num_replicas
        return cls(name, role, r.num_cpus, r.num_gpus, r.memory_gib, lo, hi)

    @property
    def memory(self) -> float:
        return self.memory_gib if self.memory_gib is not None else DEFAULT_MEMORY_GIB[self.role]


@dataclass(frozen=True)
class PodShape:
    cpus: int
    gpus: int
    memory_gib: int

    def fits(self, u: Unit) -> int:
        """How many replicas of ``u`` one pod holds (after the pod's own overhead)."""
        limits = [
            max(0.0, self.cpus - POD_OVERHEAD_CPUS) / u.cpus if u.cpus else math.inf,
            self.gpus / u.gpus if u.gpus else math.inf,
            max(0.0, self.memory_gib - POD_OVERHEAD_GIB) / u.memory,
        ]
        return max(1, math.floor(min(limits) + 1e-9))


@dataclass(frozen=True)
class GroupSize:
    name: str
    shape: PodShape
    min_replicas: int
    max_replicas: int
    units: tuple[Unit, ...]


def units(cfg: CoEConfig) -> list[Unit]:
    """Every Serve deployment the config implies, with its per-replica resources."""
    out = [Unit.of("coe-ingress", "ingress", cfg.serving.ingress)]
    for e in cfg.experts:
        if e.kind in ("model", "mixture"):
            out.append(
                Unit.of(f"expert-{e.id}", "expert", e.resources)
            )  # the builder's deployment names
    return out


def _shape(group: list[Unit], *, gpu: bool) -> PodShape:
    gpus = max([math.ceil(u.gpus) for u in group] + [1]) if gpu else 0
    min_cpus = 8 if gpu else 4
    cpus = max([math.ceil(u.cpus) + POD_OVERHEAD_CPUS for u in group] + [min_cpus])
    min_mem = 32 if gpu else 16
    mem = max([math.ceil(u.memory) + POD_OVERHEAD_GIB for u in group] + [min_mem])
    return PodShape(cpus=cpus, gpus=gpus, memory_gib=mem)


def _pods_for_total(group: list[Unit], shape: PodShape, replicas) -> int:
    usable_cpus = shape.cpus - POD_OVERHEAD_CPUS
    usable_mem = shape.memory_gib - POD_OVERHEAD_GIB
    cpu = sum(u.cpus * replicas(u) for u in group) / usable_cpus
    gpu = sum(u.gpus * replicas(u) for u in group) / shape.gpus if shape.gpus else 0
    mem = sum(u.memory * replicas(u) for u in group) / usable_mem
    return math.ceil(max(cpu, gpu, mem) - 1e-9)


def size_groups(cfg: CoEConfig, *, gpu: bool, spare: int = 1) -> list[GroupSize]:
    """The CPU group (always; it hosts ingress and router) and, with ``gpu``, the GPU group."""
    all_units = units(cfg)
    gpu_units = [u for u in all_units if u.gpus > 0]
    cpu_units = [u for u in all_units if u.gpus == 0]
    groups = []
    # Base models registered at runtime get their own deployment: room for them where models go.
    model_group = "gpu" if gpu else "cpu"
    for name, group, is_gpu in (("cpu", cpu_units, False), ("gpu", gpu_units, True)):
        if is_gpu and not gpu:
            continue
        shape = _shape(group, gpu=is_gpu)
        lo = _pods_for_total(group, shape, lambda u: u.min_replicas)
        hi = sum(math.ceil(u.max_replicas / shape.fits(u)) for u in group)
        hi += spare if name == model_group else 0
        if name == "cpu":
            lo = max(lo, 1)  # the ingress must have somewhere to run
        groups.append(GroupSize(name, shape, lo, max(hi, lo, 1), tuple(group)))
    return groups
