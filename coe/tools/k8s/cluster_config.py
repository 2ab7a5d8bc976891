"""The CoE config as the cluster sees it: same experts, router and engines; container paths.

A config on a laptop names files relative to itself (``../adapters/experts/math``). In the
image coe's repository lives at :data:`APP_DIR`, a user's own project (their config's
adapters, models, fitted routers; an image built ``FROM`` the coe image copies it) at
:data:`PROJECT_DIR`, and mutable state on a volume at :data:`STATE_DIR`, so
:func:`cluster_config` rewrites every path field to an absolute container path and fills in
where state lives. Nothing else changes, except with ``gpu=True``, where every
``model``/``mixture`` expert that asks for no GPU is given one (the rest of its resources, its
engine and its LoRA experts are untouched), and so is a model registered at runtime
(``serving.registered_model_resources``). With ``registry_url`` the registry is that external
PostgreSQL database instead of the SQLite file on the state volume. The result is validated
again with :func:`coe.config.parse_config`, so what is rendered is always a config
``coe serve`` accepts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from coe.config import CoEConfig, parse_config
from coe.errors import ConfigError
from coe.model_paths import BUILTIN
from coe.paths import REPO_ROOT

APP_DIR = PurePosixPath("/app")
"""Where the Dockerfiles put the repository (and its ``.venv``) in the image."""
STATE_DIR = PurePosixPath("/var/lib/coe")
"""Mount point of the state volume (PVC) in every Ray container."""
PROJECT_DIR = PurePosixPath("/project")
"""Where a user's image (``FROM`` the coe image) puts the user's own project folder."""
REGISTRY_PATH = STATE_DIR / "registry.sqlite"
ADAPTERS_DIR = STATE_DIR / "adapters"
"""Runtime-registered adapters are copied here; it is always one of ``serving.adapter_roots``."""


@dataclass
class ClusterConfig:
    """The rewritten config: ``data`` (a mapping for ``args.config_yaml``) and its parsed form."""

    data: dict
    config: CoEConfig
    changes: list[str] = field(default_factory=list)  # human-readable, printed by the CLI
    base_dir: str = str(APP_DIR)
    """The config's folder in the container (the builder's ``base_dir``)."""
    project_files: list[str] = field(default_factory=list)
    """Config fields that name files of the user's project (they must be in the image at PROJECT_DIR)."""


class _Paths:
    """Maps local paths to container paths: coe's repository, the user's project, the state volume."""

    def __init__(self, base: Path, project: Path | None) -> None:
        self.base, self.project = base, project
        self.project_files: list[str] = []

    def container(self, value: str, where: str) -> str:
        """A path in the config → the same file's path in the container, or ConfigError."""
        if value.startswith(str(STATE_DIR) + "/") or value == str(STATE_DIR):
            return value
        local = (self.base / Path(value).expanduser()).resolve()
        mapped = _in_image(local) if self.project is None else None
        if mapped is None and self.project is not None:
            mapped = _under(local, self.project, PROJECT_DIR)
            if mapped is not None:
                self.project_files.append(where)
        if mapped is None:
            mapped = _in_image(local)
        if mapped is None:
            project = f"your project {self.project} (copied to {PROJECT_DIR} by your image), " if self.project else ""
            raise ConfigError(
                f"{where} is {value!r}, which resolves to {local}: outside the repository, so it is not "
                f"in the image. Allowed on Kubernetes: a path in {project}inside coe's repository (at "
                f"{APP_DIR}), or an absolute path under the state volume {STATE_DIR}. For files of your own "
                "project, render with --project DIR and an image built FROM the coe image (docs/kubernetes.md)"
            )
        return mapped

    def model(self, value: str, where: str) -> str:
        """A model/embedder reference: aliases and hub ids stay; local folders become container paths."""
        if value in BUILTIN:
            return value
        if value.startswith((".", "/", "~")) or (self.base / value).exists():
            return self.container(value, where)
        return value  # a hub id, fetched by the library in the pod


def _in_image(local: Path) -> str | None:
    """Where one of coe's own files is in the image, or None when ``local`` is not coe's.

    The image holds coe's repository at :data:`APP_DIR`. A wheel install keeps the shipped
    configs and adapters inside the package (``site-packages/coe/configs``), so those folders
    map to their repository folders whatever the local layout; the rest of a checkout maps as is.
    """
    from importlib.resources import files

    for package, folder in (("coe.configs", "configs"), ("coe.adapters", "adapters")):
        mapped = _under(local, Path(str(files(package))), APP_DIR / folder)
        if mapped is not None:
            return mapped
    return _under(local, REPO_ROOT, APP_DIR)


def _under(local: Path, root: Path, mount: PurePosixPath) -> str | None:
    try:
        rel = local.relative_to(root.resolve())
    except ValueError:
        return None
    return str(mount / rel.as_posix()) if rel.parts else str(mount)


def cluster_config(
    path: str | Path,
    *,
    gpu: bool = False,
    port: int | None = None,
    project: str | Path | None = None,
    registry_url: str | None = None,
) -> ClusterConfig:
    """Read the config at ``path`` and rewrite it for the cluster (see the module docstring).

    ``project``: the user's project folder, mapped to :data:`PROJECT_DIR` (default: the
    config's folder when the config lives outside coe's repository; none for coe's own
    configs). ``registry_url``: an external PostgreSQL registry (``postgresql://USER@HOST/DB``;
    its password comes from a Secret, see ``RenderOptions.registry_secret``).

    Raises :class:`ConfigError` for an invalid config (an inline ``serving.admin_key`` or
    ``serving.api_key`` among them: keys come from Secrets), a path that would not exist in the
    container, or, without ``gpu``, an expert that asks for GPUs.
    """
    import yaml

    from coe.config import load_config

    path = Path(path)
    load_config(path)  # the user's file is valid as written (same errors as `coe serve`)
    data = copy.deepcopy(yaml.safe_load(path.read_text()))
    base = path.resolve().parent
    if project is None and _in_image(base) is None:
        project = base  # a user's config in their own project
    paths = _Paths(base, Path(project).resolve() if project is not None else None)
    if paths.project is not None and not paths.project.is_dir():
        raise ConfigError(f"--project is {project!r}: not a folder; give the folder your image copies to {PROJECT_DIR}")
    changes: list[str] = []

    serving = data.setdefault("serving", {})  # (inline keys were refused by load_config)

    router = data.setdefault("router", {})
    if router.get("embedder"):
        router["embedder"] = paths.model(router["embedder"], "router.embedder")
    if router.get("fitted"):
        router["fitted"] = paths.container(router["fitted"], "router.fitted")

    for i, expert in enumerate(data.get("experts") or []):
        where = f"experts[{i}] ({expert.get('id')})"
        kind = expert.get("kind")
        if kind == "model":
            expert["model"] = paths.model(expert["model"], f"{where}.model")
        elif kind == "lora":
            expert["adapter"] = paths.container(expert["adapter"], f"{where}.adapter")
        elif kind == "mixture" and expert.get("checkpoint"):
            expert["checkpoint"] = paths.container(
                expert["checkpoint"], f"{where}.checkpoint"
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
    if registry_url is not None:
        if serving.get("registry_path"):
            raise ConfigError(
                f"{path}: serving.registry_path is set and --registry-url is given; the registry is one "
                "database: remove serving.registry_path to use the external one"
            )
        changes.append(f"serving.registry_url: {serving.get('registry_url')} -> {registry_url} (external database)")
        serving["registry_url"] = registry_url
    if serving.get("registry_url"):
        pass  # an external database: its password comes from a Secret (RenderOptions.registry_secret)
    elif serving.get("registry_path"):
        serving["registry_path"] = paths.container(
            serving["registry_path"], "serving.registry_path"
        )
    else:
        serving["registry_path"] = str(REGISTRY_PATH)
        changes.append(f"serving.registry_path: (default) -> {REGISTRY_PATH} (state volume)")
    roots = [
        paths.container(r, f"serving.adapter_roots[{j}]")
        for j, r in enumerate(serving.get("adapter_roots") or [])
    ]
    if str(ADAPTERS_DIR) not in roots:
        roots.append(str(ADAPTERS_DIR))
    serving["adapter_roots"] = roots
    if gpu:
        # A model registered at runtime (POST /v1/experts) without resources lands where the
        # config's models do: on the GPU worker group.
        registered = serving.setdefault("registered_model_resources", {}) or {}
        serving["registered_model_resources"] = registered
        if not registered.get("num_gpus"):
            registered["num_gpus"] = 1
            changes.append("serving.registered_model_resources.num_gpus: 0 -> 1 (--gpu)")
        admission = serving.get("admission") or {}
        if admission.get("max_running_per_server") is not None:
            # The bound sized for a CPU server would starve a GPU one (vLLM batches hundreds there).
            changes.append(f"serving.admission.max_running_per_server: {admission.pop('max_running_per_server')} "
                           "-> none (--gpu: size it for your GPU servers if you want one)")
            if not admission:
                serving.pop("admission", None)
    elif (serving.get("registered_model_resources") or {}).get("num_gpus"):
        raise ConfigError(
            f"{path}: serving.registered_model_resources.num_gpus is set; this render has no GPU worker "
            "group. Render with --gpu"
        )

    config = parse_config(data, source=f"{path} (as rendered for Kubernetes)")
    base_dir = str(APP_DIR)
    if paths.project is not None:
        base_dir = _under(base, paths.project, PROJECT_DIR) or str(PROJECT_DIR)
    return ClusterConfig(data=data, config=config, changes=changes, base_dir=base_dir,
                         project_files=paths.project_files)
