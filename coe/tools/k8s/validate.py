"""Schema checks for manifests: core kinds, KubeRay CRs, and the Serve config inside.

- Core objects (and the pod templates and the Serve Service embedded in a RayService) are
  checked with ``kubernetes-validate`` in strict mode against Kubernetes :data:`K8S_VERSION`.
- ``RayService`` / ``RayCluster`` are checked with ``jsonschema`` against the CRD's
  ``openAPIV3Schema`` from a folder of KubeRay CRD files. Like ``kubectl apply`` (strict field
  validation), unknown fields are errors: objects with ``properties`` are closed unless the
  schema says ``x-kubernetes-preserve-unknown-fields``.
- ``serveConfigV2`` must be a valid Ray Serve config (``ray.serve.schema.ServeDeploySchema``)
  and every application's ``args.config_yaml`` a valid CoE config.

Needs the ``dev`` extra (``kubernetes-validate``, ``jsonschema``) and, for the Serve check, ray.
Every failure raises :class:`ManifestError` naming the object and the field.
"""

from __future__ import annotations

import functools
from pathlib import Path

from coe.errors import CoEError

K8S_VERSION = "1.33.0"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


class ManifestError(CoEError):
    """A manifest does not validate against its schema."""

    status_code = 422


def _name(obj: dict) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def _closed(schema):
    """A copy of an OpenAPI schema where objects with properties reject unknown fields."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=8)
def crd_schema(crd_dir: str, kind: str, version: str) -> dict:
    import yaml

    path = Path(crd_dir) / CRD_FILES[kind]
    crd = yaml.safe_load(path.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _closed(v["schema"]["openAPIV3Schema"])
    raise ManifestError(f"{path} has no version {version!r}")


def validate_core(obj: dict, version: str = K8S_VERSION) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path) or "(top level)"
        raise ManifestError(f"{_name(obj)}: {where}: {err.message}") from None
    except kubernetes_validate.SchemaNotFoundError as err:
        raise ManifestError(
            f"{_name(obj)}: no Kubernetes {version} schema for it ({err})"
        ) from None


def validate_custom(obj: dict, crd_dir: str | Path) -> None:
    import jsonschema

    group_version = obj.get("apiVersion", "")
    if obj.get("kind") not in CRD_FILES or not group_version.startswith("ray.io/"):
        raise ManifestError(f"{_name(obj)}: not a KubeRay kind ({', '.join(CRD_FILES)})")
    schema = crd_schema(str(crd_dir), obj["kind"], group_version.split("/", 1)[1])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        lines = [
            f"{'.'.join(str(p) for p in e.path) or '(top level)'}: {e.message[:300]}"
            for e in errors[:10]
        ]
        raise ManifestError(f"{_name(obj)} does not match the CRD schema:\n  " + "\n  ".join(lines))


def embedded_core_objects(obj: dict) -> list[dict]:
    """Pod templates (as ``PodTemplate``) and the Serve Service inside a RayService/RayCluster."""
    spec = obj.get("spec", {})
    cluster = spec.get("rayClusterConfig", spec) if obj.get("kind") == "RayService" else spec
    name = obj.get("metadata", {}).get("name", "x")
    out = []
    groups = [("head", cluster.get("headGroupSpec", {}))]
    groups += [(g.get("groupName", "worker"), g) for g in cluster.get("workerGroupSpecs") or []]
    for group, g in groups:
        out.append(
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{name}-{group}"},
                "template": g.get("template", {}),
            }
        )
    if obj.get("kind") == "RayService" and "serveService" in spec:
        out.append({"apiVersion": "v1", "kind": "Service", **spec["serveService"]})
    return out


def validate_serve_config(obj: dict) -> list:
    """Check ``serveConfigV2``; returns the parsed CoE configs of its applications."""
    import yaml

    from coe.config import parse_config
    from coe.errors import ConfigError

    text = obj.get("spec", {}).get("serveConfigV2")
    if not isinstance(text, str):
        raise ManifestError(f"{_name(obj)}: spec.serveConfigV2 is missing (a YAML string)")
    data = yaml.safe_load(text)
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(data)
    except (ValidationError, TypeError, ValueError) as err:
        raise ManifestError(
            f"{_name(obj)}: spec.serveConfigV2 is not a valid Ray Serve config: {err}"
        ) from None
    configs = []
    for app in data["applications"]:
        args = app.get("args") or {}
        if "config_yaml" not in args:
            raise ManifestError(
                f"{_name(obj)}: application {app.get('name')!r} has no args.config_yaml"
            )
        try:
            configs.append(
                parse_config(
                    yaml.safe_load(args["config_yaml"]), source=f"{_name(obj)} config_yaml"
                )
            )
        except ConfigError as err:
            raise ManifestError(str(err)) from None
    return configs


def validate_objects(objects: list[dict], crd_dir: str | Path, *, serve: bool = True) -> None:
    """Validate every object (see the module docstring); raises :class:`ManifestError`."""
    for obj in objects:
        if obj.get("apiVersion", "").startswith("ray.io/"):
            validate_custom(obj, crd_dir)
            for inner in embedded_core_objects(obj):
                validate_core(inner)
            if serve and obj["kind"] == "RayService":
                validate_serve_config(obj)
        else:
            validate_core(obj)
