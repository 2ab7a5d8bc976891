"""``coe k8s render`` (manifests from a config) and ``coe k8s validate`` (schema checks)."""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    parser = sub.add_parser("k8s", help="render or validate KubeRay manifests for a config")
    cmds = parser.add_subparsers(dest="k8s_command", metavar="ACTION")
    cmds.required = True

    render = cmds.add_parser("render", help="write the RayService + state volume for a config")
    render.add_argument("--config", default=None, help="CoE config (default: the embedded one)")
    render.add_argument(
        "--gpu",
        action="store_true",
        help="CUDA image, a GPU worker group, one GPU per model expert",
    )
    render.add_argument(
        "--out",
        default=None,
        help="write a kustomization into this folder (default: YAML to stdout)",
    )
    render.add_argument("--name", default="coe", help="RayService name (default: coe)")
    render.add_argument(
        "--image", default=None, help="container image (default: coe:0.1.0-cpu / coe:0.1.0-cuda)"
    )
    render.add_argument(
        "--storage-class",
        default=None,
        help="StorageClass of the state volume (default: the cluster's)",
    )
    render.add_argument(
        "--state-size", default="20Gi", help="size of the state volume (default: 20Gi)"
    )
    render.add_argument(
        "--project",
        default=None,
        help="your project folder, copied to /project by your image (FROM the coe image); default: the "
        "config's folder when it is outside coe's repository",
    )
    render.add_argument(
        "--registry-url",
        default=None,
        help="external PostgreSQL registry, postgresql://USER@HOST:PORT/DB (no password)",
    )
    render.add_argument(
        "--registry-secret",
        default="coe-registry",
        help="Secret with the registry password, NAME or NAME:KEY (default: coe-registry:password)",
    )
    render.add_argument(
        "--gcs-redis",
        default=None,
        metavar="HOST:PORT",
        help="GCS fault tolerance: the external Redis that keeps the Ray head's state",
    )
    render.add_argument(
        "--gcs-redis-secret",
        default=None,
        help="Secret with the Redis password, NAME or NAME:KEY (default key: password)",
    )
    render.set_defaults(func=_render)

    validate = cmds.add_parser("validate", help="validate a kustomization folder or manifest files")
    validate.add_argument("paths", nargs="+", help="kustomization folders or YAML files")
    validate.add_argument(
        "--crds",
        default=os.environ.get("COE_KUBERAY_CRDS"),
        help="folder with KubeRay's ray.io_rayservices.yaml / ray.io_rayclusters.yaml (env COE_KUBERAY_CRDS)",
    )
    validate.set_defaults(func=_validate)


def _options(args):
    from pydantic import ValidationError

    from coe.config import format_validation_error
    from coe.errors import ConfigError
    from coe.tools.k8s import RenderOptions

    fields = {"name": args.name, "state_size": args.state_size, "storage_class": args.storage_class,
              "project": args.project, "registry_url": args.registry_url, "gcs_redis_address": args.gcs_redis}
    name, _, key = args.registry_secret.partition(":")
    fields |= {"registry_secret": name} | ({"registry_secret_key": key} if key else {})
    if args.gcs_redis_secret:
        name, _, key = args.gcs_redis_secret.partition(":")
        fields |= {"gcs_redis_secret": name} | ({"gcs_redis_secret_key": key} if key else {})
    if args.image:
        fields["image_cuda" if args.gpu else "image_cpu"] = args.image
    try:
        return RenderOptions(**fields)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "k8s render options")) from None


def _render(args) -> int:
    from pathlib import Path

    from coe.paths import default_config_path
    from coe.tools.k8s import render_cluster, to_yaml
    from coe.tools.k8s.cluster_config import cluster_config
    from coe.tools.k8s.manifests import dump_yaml

    opts = _options(args)
    config = Path(args.config) if args.config else default_config_path()
    cc = cluster_config(config, gpu=args.gpu, project=opts.project, registry_url=opts.registry_url)
    objects = render_cluster(cc, gpu=args.gpu, options=opts)
    for change in cc.changes:
        print(f"note: {change}", file=sys.stderr)
    if args.out is None:
        sys.stdout.write(to_yaml(objects))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"state-pvc.yaml": to_yaml([objects[0]]), "rayservice.yaml": to_yaml([objects[1]])}
    files["kustomization.yaml"] = dump_yaml(
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": list(files),
        }
    )
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)  # each file appears whole or not at all
    print(f"wrote {', '.join(files)} to {out}; apply with: kubectl apply -k {out}", file=sys.stderr)
    return 0


def _validate(args) -> int:
    from pathlib import Path

    import yaml

    from coe.errors import ConfigError
    from coe.tools.k8s.kustomize import build
    from coe.tools.k8s.validate import CRD_FILES, validate_objects

    if not args.crds or not all((Path(args.crds) / f).is_file() for f in CRD_FILES.values()):
        raise ConfigError(
            f"--crds is {args.crds!r}; it must be a folder holding {', '.join(CRD_FILES.values())} "
            "(KubeRay's ray-operator/config/crd/bases), or set COE_KUBERAY_CRDS"
        )
    for p in map(Path, args.paths):
        if p.is_dir():
            objects = build(p)
        elif p.is_file():
            objects = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
        else:
            raise ConfigError(f"{p} does not exist; give kustomization folders or YAML files")
        validate_objects(objects, args.crds)
        kinds = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
        print(f"{p}: valid ({kinds})")
    return 0
