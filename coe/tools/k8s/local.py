"""The ``serveConfigV2`` that ``coe k8s render`` writes, run on a Ray cluster on this machine.

Used by the multi-node tests and ``bench/scale_out.py``, so that what runs there is what the
RayService would run: :func:`localize` maps the container paths of the rendered config back to
folders of this machine and keeps Serve on loopback; :func:`deploy` applies it the way
``serve deploy`` does (the dashboard's REST handler: start Serve with the config's HTTP options,
then ``deploy_apps`` on the controller), without needing the dashboard.
"""

from __future__ import annotations

import copy
from pathlib import Path

from coe.paths import REPO_ROOT
from coe.tools.k8s.cluster_config import APP_DIR, PROJECT_DIR, STATE_DIR


def rendered_serve_config(manifests: list[dict]) -> dict:
    """The ``serveConfigV2`` of the RayService among ``manifests`` (as ``render`` returns them)."""
    import yaml

    service = next(m for m in manifests if m.get("kind") == "RayService")
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def localize(serve_config: dict, *, project: Path | None, state: Path, port: int,
             proxy_location: str = "HeadOnly") -> dict:
    """``serve_config`` with its container paths on this machine: the image's repository
    (``/app``) is this checkout, the user's project (``/project``) is ``project`` and the state
    volume (``/var/lib/coe``) is ``state``. HTTP listens on 127.0.0.1:``port``. Every node of a
    local cluster has the same address, so one proxy (on the head) serves HTTP, where on
    Kubernetes every pod has its own (``proxy_location: EveryNode``). Nothing else changes."""
    import yaml

    mounts = {str(APP_DIR): REPO_ROOT, str(STATE_DIR): state}
    if project is not None:
        mounts[str(PROJECT_DIR)] = project
    out = copy.deepcopy(serve_config)
    out["http_options"] = {**out.get("http_options", {}), "host": "127.0.0.1", "port": port}
    out["proxy_location"] = proxy_location
    for app in out["applications"]:
        args = app.get("args", {})
        if "config_yaml" in args:
            args["config_yaml"] = yaml.safe_dump(_mapped(yaml.safe_load(args["config_yaml"]), mounts), sort_keys=False)
        if "base_dir" in args:
            args["base_dir"] = _mapped(args["base_dir"], mounts)
    return out


def _mapped(value, mounts: dict[str, Path]):
    if isinstance(value, dict):
        return {k: _mapped(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [_mapped(v, mounts) for v in value]
    if isinstance(value, str):
        for mount, local in mounts.items():
            if value == mount or value.startswith(mount + "/"):
                return str(Path(local)) + value[len(mount):]
    return value


def deploy(serve_config: dict) -> None:
    """Apply ``serve_config`` to the connected Ray cluster as ``serve deploy`` does; returns once
    the controller accepted it (poll ``serve.status()`` for RUNNING)."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config)
    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
                         grpc_options=config.grpc_options.model_dump())
    client.deploy_apps(config)
