"""The one builder of the service: ``build_app(config) -> ray.serve.Application``.

Used by ``coe serve``, by ``serve run coe.serving.app:app_builder config_path=...`` and by the
KubeRay manifests (``import_path: coe.serving.app:app_builder``), so all three run the same thing.
Importing this module starts nothing and imports no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from coe.config import CoEConfig

if TYPE_CHECKING:  # pragma: no cover
    from ray.serve import Application

    from coe.serving.deployments.spec import ServerSpec

APP_NAME = "coe"


def build_app(config: CoEConfig, *, base_dir: Path | None = None) -> Application:
    """The Serve application: one ingress bound to one expert-server deployment per model (and
    mixture) expert of the config plus the experts registered at runtime (the registry).

    ``base_dir`` is the folder relative config paths resolve against (the config file's)."""
    from coe.serving.deployments.ingress import CoEIngress
    from coe.serving.deployments.ray_deployments import bind_server, serve_options
    from coe.serving.deployments.spec import INGRESS_ENV

    base_dir = Path(base_dir).resolve() if base_dir is not None else None
    specs = plan(config, base_dir=base_dir)
    servers = {sid: bind_server(spec) for sid, spec in specs.items()}
    ingress = CoEIngress.options(**serve_options("coe-ingress", config.serving.ingress, INGRESS_ENV))
    return ingress.bind(config.model_dump_json(exclude_unset=True), str(base_dir) if base_dir else None, servers)


def plan(config: CoEConfig, *, base_dir: Path | None = None) -> dict[str, ServerSpec]:
    """The expert servers :func:`build_app` deploys: one per model/mixture expert of the config
    and of the registry (runtime registrations persist), keyed by deployment name. Imports no Ray;
    ``coe serve`` checks it against the cluster's resources before deploying."""
    from coe.registry import live_experts, open_registry
    from coe.serving.deployments.spec import plan_servers

    base_dir = Path(base_dir).resolve() if base_dir is not None else None
    experts = live_experts(config, open_registry(config, base_dir))
    return plan_servers(experts, base_dir=base_dir, batching=config.serving.batching, pool=config.serving.pool,
                        max_adapters=config.serving.adapters_per_replica)


def load_app_config(args: dict) -> tuple[CoEConfig, Path | None]:
    """The config named by Serve builder args: ``config_path`` (a YAML file; default: the
    embedded default) or ``config_yaml`` (inline YAML; paths relative to ``base_dir``, default
    the current folder)."""
    import yaml

    from coe.config import load_config, parse_config
    from coe.errors import ConfigError
    from coe.paths import default_config_path

    unknown = set(args) - {"config_path", "config_yaml", "base_dir"}
    if unknown:
        raise ConfigError(f"unknown app_builder args {sorted(unknown)}; allowed: config_path, config_yaml, base_dir")
    if "config_yaml" in args:
        try:
            data = yaml.safe_load(args["config_yaml"])
        except yaml.YAMLError as err:
            raise ConfigError(f"config_yaml is not valid YAML: {err}") from None
        base = Path(args.get("base_dir") or Path.cwd())
        return parse_config(data, source="config_yaml", base_dir=base), base  # paths resolved once, here
    path = Path(args.get("config_path") or default_config_path()).expanduser().resolve()
    return load_config(path), Path(args.get("base_dir") or path.parent)


def app_builder(args: dict) -> Application:
    """Serve ``import_path`` target: args ``{"config_path": ...}`` or ``{"config_yaml": ...}``."""
    config, base_dir = load_app_config(dict(args or {}))
    return build_app(config, base_dir=base_dir)
