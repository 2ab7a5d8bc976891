"""The CoE config as the cluster sees it: same experts, router and engines; container paths.

A config on a laptop names files relative to itself (``../adapters/experts/math``). In the
image the repository lives at :data:`APP_DIR` and mutable state on a volume at
:data:`STATE_DIR`, so :func:`cluster_config` rewrites every path field to an absolute container
path and fills in where state lives. Nothing else changes, except with ``gpu=True``, where
every ``model``/``mixture`` expert that asks for no GPU is given one (the rest of its
resources, its engine and its LoRA experts are untouched). The result is validated again with
:func:`coe.config.parse_config`, so what is rendered is always a config ``coe serve`` accepts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from coe.config import CoEConfig, parse_config
from coe.errors import ConfigError
from coe.models import BUILTIN
from coe.paths import REPO_ROOT

APP_DIR = PurePosixPath("/app")
"""Where the Dockerfiles put the repository (and its ``.venv``) in the image."""
STATE_DIR = PurePosixPath("/var/lib/coe")
"""Mount point of the state volume (PVC) in every Ray container."""
REGISTRY_PATH = STATE_DIR / "registry.sqlite"
ADAPTERS_DIR = STATE_DIR / "adapters"
"""Runtime-registered adapters are copied here; it is always one of ``serving.adapter_roots``."""


@dataclass
class ClusterConfig:
    """The rewritten config: ``data`` (a mapping for ``args.config_yaml``) and its parsed form."""

    data: dict
    config: CoEConfig
    changes: list[str] = field(default_factory=list)  # human-readable, printed by the CLI


def _container_path(value: str, where: str, base: Path) -> str:
    """A path in the config → the same file's path in the container, or ConfigError."""
    if value.startswith(str(STATE_DIR) + "/") or value == str(STATE_DIR):
        return value
    local = (base / Path(value).expanduser()).resolve()
    try:
        rel = local.relative_to(REPO_ROOT)
    except ValueError:
        raise ConfigError(
            f"{where} is {value!r}, which resolves to {local}: outside the repository, so it is not "
            f"in the image. Allowed on Kubernetes: a path inside the repository (copied to {APP_DIR}) "
            f"or an absolute path under the state volume {STATE_DIR}"
        ) from None
    return str(APP_DIR / rel.as_posix()) if rel.parts else str(APP_DIR)


def _model_ref(value: str, where: str, base: Path) -> str:
    """A model/embedder reference: aliases and hub ids stay; local folders become container paths."""
    if value in BUILTIN:
        return value
    looks_local = value.startswith((".", "/", "~")) or (base / value).exists()
    if looks_local:
        return _container_path(value, where, base)
    return value  # a hub id, fetched by the library in the pod


def cluster_config(
    path: str | Path, *, gpu: bool = False, port: int | None = None
) -> ClusterConfig:
    """Read the config at ``path`` and rewrite it for the cluster (see the module docstring).

    Raises :class:`ConfigError` for an invalid config, a path that would not exist in the
    container, an inline ``serving.admin_key`` (it belongs in a Secret), or, without ``gpu``,
    an expert that asks for GPUs.
    """
    import yaml

    from coe.config import load_config

    path = Path(path)
    load_config(path)  # the user's file is valid as written (same errors as `coe serve`)
    data = copy.deepcopy(yaml.safe_load(path.read_text()))
    base = path.resolve().parent
    changes: list[str] = []

    serving = data.setdefault("serving", {})
    if serving.get("admin_key"):
        env = serving.get("admin_key_env", "COE_ADMIN_KEY")
        raise ConfigError(
            f"{path}: serving.admin_key is set inline; on Kubernetes the key comes from the Secret "
            f"mounted as the environment variable {env} (serving.admin_key_env). Remove serving.admin_key"
        )

    router = data.setdefault("router", {})
    if router.get("embedder"):
        router["embedder"] = _model_ref(router["embedder"], "router.embedder", base)
    if router.get("fitted"):
        router["fitted"] = _container_path(router["fitted"], "router.fitted", base)

    for i, expert in enumerate(data.get("experts") or []):
        where = f"experts[{i}] ({expert.get('id')})"
        kind = expert.get("kind")
        if kind == "model":
            expert["model"] = _model_ref(expert["model"], f"{where}.model", base)
        elif kind == "lora":
            expert["adapter"] = _container_path(expert["adapter"], f"{where}.adapter", base)
        elif kind == "mixture" and expert.get("checkpoint"):
            expert["checkpoint"] = _container_path(
                expert["checkpoint"], f"{where}.checkpoint", base
            )
        if kind in ("model", "mixture"):
            resources = expert.setdefault("resources", {})
            if gpu and not resources.get("num_gpus"):
                resources["num_gpus"] = 1
                changes.append(f"experts[{expert['id']}].resources.num_gpus: 0 -> 1 (--gpu)")
            elif not gpu and resources.get("num_gpus"):
                raise ConfigError(
                    f"{where}.resources.num_gpus is {resources['num_gpus']}; this render has no GPU "
                    f"worker group. Render with --gpu (the CUDA image and a GPU worker group)"
                )

    if serving.get("host") not in (None, "0.0.0.0"):
        changes.append(
            f"serving.host: {serving['host']} -> 0.0.0.0 (the Serve proxy listens on the pod)"
        )
    serving["host"] = "0.0.0.0"
    if port is not None:
        serving["port"] = port
    if serving.get("registry_path"):
        serving["registry_path"] = _container_path(
            serving["registry_path"], "serving.registry_path", base
        )
    else:
        serving["registry_path"] = str(REGISTRY_PATH)
        changes.append(f"serving.registry_path: (default) -> {REGISTRY_PATH} (state volume)")
    roots = [
        _container_path(r, f"serving.adapter_roots[{j}]", base)
        for j, r in enumerate(serving.get("adapter_roots") or [])
    ]
    if str(ADAPTERS_DIR) not in roots:
        roots.append(str(ADAPTERS_DIR))
    serving["adapter_roots"] = roots

    config = parse_config(data, source=f"{path} (as rendered for Kubernetes)")
    return ClusterConfig(data=data, config=config, changes=changes)
