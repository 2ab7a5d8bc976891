"""The Kubernetes objects: a KubeRay ``RayService`` and the state ``PersistentVolumeClaim``.

Close to KubeRay's own ``ray-service.*.yaml`` samples: a head group that runs no replicas
(``num-cpus: "0"``), a CPU worker group (ingress, router, and on the CPU target the engines),
on the GPU target a GPU worker group (``nvidia.com/gpu``) for the experts, in-tree
autoscaling, and ``serveConfigV2`` importing the same builder ``coe serve`` uses with the
config inline (``args.config_yaml``). Worker pods are ready only when the service's
``/readyz`` answers 200, and the Serve Service excludes the head, so traffic reaches the
service only once every expert's engine has loaded.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from coe.errors import ConfigError
from coe.serving.deployments.spec import proxy_env
from coe.tools.k8s.cluster_config import PROJECT_DIR, STATE_DIR, ClusterConfig, cluster_config
from coe.tools.k8s.sizing import GroupSize, size_groups

RAY_VERSION = "2.60.0"
IMPORT_PATH = "coe.serving.app:app_builder"
APP_NAME = "coe"
STATE_VOLUME = "coe-state"
DNS_LABEL = r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$"


class RenderOptions(BaseModel):
    """What the config does not say about the cluster. Defaults match ``k8s/``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "coe", pattern=DNS_LABEL, description="RayService name (a DNS label, at most 40)."
    )
    image_cpu: str = Field(
        "coe:0.1.0-cpu", min_length=1, description="Image built from k8s/docker/Dockerfile.cpu."
    )
    image_cuda: str = Field(
        "coe:0.1.0-cuda", min_length=1, description="Image built from k8s/docker/Dockerfile.cuda."
    )
    admin_secret: str = Field(
        "coe-admin", pattern=DNS_LABEL, description="Secret holding the admin key."
    )
    admin_secret_key: str = Field(
        "admin-key", pattern=r"^[-._a-zA-Z0-9]+$", description="Key in that Secret."
    )
    api_secret: str = Field(
        "coe-api", pattern=DNS_LABEL,
        description="Secret holding the chat key; optional: without it, chat is open.",
    )
    api_secret_key: str = Field(
        "api-key", pattern=r"^[-._a-zA-Z0-9]+$", description="Key in that Secret."
    )
    state_size: str = Field(
        "20Gi", pattern=r"^[0-9]+(Mi|Gi|Ti)$", description="Size of the state volume."
    )
    storage_class: str | None = Field(
        None, description="StorageClass of the state volume; None: the default."
    )
    head_cpus: int = Field(2, ge=1)
    head_memory_gib: int = Field(8, ge=2)
    project: str | None = Field(
        None,
        description="The user's project folder, which their image (FROM the coe image) copies to /project; "
        "config paths inside it map there. None: the config's folder when it is outside coe's repository.",
    )
    registry_url: str | None = Field(
        None,
        pattern=r"^postgresql(\+psycopg)?://",
        description="External PostgreSQL expert registry (postgresql://USER@HOST:PORT/DB, no password) "
        "instead of the SQLite file on the state volume; the password comes from registry_secret.",
    )
    registry_secret: str = Field(
        "coe-registry", pattern=DNS_LABEL, description="Secret holding the registry database password."
    )
    registry_secret_key: str = Field(
        "password", pattern=r"^[-._a-zA-Z0-9]+$", description="Key in that Secret."
    )
    gcs_redis_address: str | None = Field(
        None,
        pattern=r"^(rediss?://)?[A-Za-z0-9]([-.A-Za-z0-9]*[A-Za-z0-9])?:[0-9]{1,5}$",
        description="GCS fault tolerance: the external Redis (HOST:PORT) that keeps the Ray head's state, so "
        "Serve keeps serving and recovers its applications when the head pod restarts (KubeRay "
        "gcsFaultToleranceOptions). None: no GCS fault tolerance.",
    )
    gcs_redis_secret: str | None = Field(
        None, pattern=DNS_LABEL, description="Secret holding the Redis password (None: Redis without a password)."
    )
    gcs_redis_secret_key: str = Field(
        "password", pattern=r"^[-._a-zA-Z0-9]+$", description="Key in that Secret."
    )

    @model_validator(mode="after")
    def _redis_secret_needs_redis(self) -> RenderOptions:
        if self.gcs_redis_secret is not None and self.gcs_redis_address is None:
            raise ValueError("gcs_redis_secret is set without gcs_redis_address; give the Redis address too")
        return self


def _labels(opts: RenderOptions) -> dict:
    return {"app.kubernetes.io/name": "coe", "app.kubernetes.io/instance": opts.name}


def _quantity(cpus: int, memory_gib: int, gpus: int = 0) -> dict:
    q = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        q["nvidia.com/gpu"] = str(gpus)
    # requests == limits: Guaranteed QoS, and Ray sizes itself from the limits.
    return {"limits": dict(q), "requests": dict(q)}


def _env(cc: ClusterConfig, opts: RenderOptions) -> list[dict]:
    serving = cc.config.serving
    ref = {"name": opts.admin_secret, "key": opts.admin_secret_key}
    # chat is open unless a key is set, so a pod starts without the chat-key Secret
    chat = {"name": opts.api_secret, "key": opts.api_secret_key, "optional": True}
    env = [
        {"name": serving.admin_key_env, "valueFrom": {"secretKeyRef": ref}},
        {"name": serving.api_key_env, "valueFrom": {"secretKeyRef": chat}},
    ]
    if serving.registry_url is not None:
        db = {"name": opts.registry_secret, "key": opts.registry_secret_key}
        env.append({"name": serving.registry_password_env, "valueFrom": {"secretKeyRef": db}})
    # read by Serve's proxy (or HAProxy) on each node; a pod is its own network namespace: default paths and ports
    env += [{"name": k, "value": v} for k, v in proxy_env(serving.proxy).items()]
    return env


def _pod_spec(container: dict, opts: RenderOptions, *, gpu: bool = False) -> dict:
    spec = {
        # rayproject/ray runs as uid 1000, gid 100: make the state volume writable for it.
        "securityContext": {"fsGroup": 100},
        "containers": [container],
        "volumes": [
            {"name": STATE_VOLUME, "persistentVolumeClaim": {"claimName": f"{opts.name}-state"}}
        ],
    }
    if gpu:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return spec


def _container(
    name: str, image: str, resources: dict, cc: ClusterConfig, opts: RenderOptions
) -> dict:
    return {
        "name": name,
        "image": image,
        "resources": resources,
        "env": _env(cc, opts),
        "volumeMounts": [{"name": STATE_VOLUME, "mountPath": str(STATE_DIR)}],
    }


def _worker_group(group: GroupSize, image: str, cc: ClusterConfig, opts: RenderOptions) -> dict:
    port = cc.config.serving.port
    container = _container(
        "ray-worker",
        image,
        _quantity(group.shape.cpus, group.shape.memory_gib, group.shape.gpus),
        cc,
        opts,
    )
    container["ports"] = [{"containerPort": port, "name": "serve"}]
    # Replaces KubeRay's default worker readiness (raylet + proxy health): a pod enters the
    # Serve Service only when the application says every expert's engine has loaded.
    container["readinessProbe"] = {
        "httpGet": {"path": "/readyz", "port": port},
        "initialDelaySeconds": 10,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }
    is_gpu = group.shape.gpus > 0
    return {
        "groupName": f"{group.name}-workers",
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": {**_labels(opts), "coe.ai/group": group.name}},
            "spec": _pod_spec(container, opts, gpu=is_gpu),
        },
    }


def serve_config(cc: ClusterConfig) -> dict:
    """The Ray Serve config (``serveConfigV2``): one application from the builder, config inline."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cc.config.serving.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"config_yaml": dump_yaml(cc.data), "base_dir": cc.base_dir},
            }
        ],
    }


def ray_service(cc: ClusterConfig, opts: RenderOptions, *, gpu: bool) -> dict:
    image = opts.image_cuda if gpu else opts.image_cpu
    port = cc.config.serving.port
    head = _container("ray-head", image, _quantity(opts.head_cpus, opts.head_memory_gib), cc, opts)
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": port, "name": "serve"},
    ]
    groups = size_groups(cc.config, gpu=gpu)
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": opts.name, "labels": _labels(opts)},
        "spec": {
            "serveConfigV2": dump_yaml(serve_config(cc)),
            # Traffic only through worker pods, whose readiness is the application's /readyz.
            "excludeHeadPodFromServeSvc": True,
            "serveService": {
                "metadata": {"name": f"{opts.name}-serve", "labels": _labels(opts)},
                "spec": {
                    "type": "ClusterIP",
                    "ports": [{"name": "serve", "port": port, "targetPort": port}],
                },
            },
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 300,
                    "resources": {
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                    },
                },
                "headGroupSpec": {
                    # The head runs GCS, the Serve controller and a proxy, but no replicas.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {
                        "metadata": {"labels": _labels(opts)},
                        "spec": _pod_spec(head, opts),
                    },
                },
                "workerGroupSpecs": [_worker_group(g, image, cc, opts) for g in groups],
            },
        },
    }
    if opts.gcs_redis_address is not None:
        cluster["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] = _gcs_fault_tolerance(opts)
    return cluster


def _gcs_fault_tolerance(opts: RenderOptions) -> dict:
    """KubeRay's ``gcsFaultToleranceOptions``: the head's GCS state in an external Redis."""
    options: dict = {"redisAddress": opts.gcs_redis_address}
    if opts.gcs_redis_secret is not None:
        ref = {"name": opts.gcs_redis_secret, "key": opts.gcs_redis_secret_key}
        options["redisPassword"] = {"valueFrom": {"secretKeyRef": ref}}
    return options


def state_claim(opts: RenderOptions) -> dict:
    """The state volume: expert registry (SQLite) and runtime-registered adapters.

    ReadWriteMany because every Ray pod mounts it (the ingress writes the registry, engines read
    adapters) and pods spread over nodes.
    """
    spec = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": opts.state_size}},
    }
    if opts.storage_class:
        spec["storageClassName"] = opts.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": f"{opts.name}-state", "labels": _labels(opts)},
        "spec": spec,
    }


def render(
    config: str | Path, *, gpu: bool = False, options: RenderOptions | None = None
) -> list[dict]:
    """The manifests for ``config``: ``[PersistentVolumeClaim, RayService]``.

    Raises :class:`coe.errors.ConfigError` as :func:`cluster_config` does. The key Secrets
    (admin key; chat key, optional) are not rendered (a key does not belong in a manifest);
    create them with kubectl.
    """
    opts = options or RenderOptions()
    cc = cluster_config(config, gpu=gpu, project=opts.project, registry_url=opts.registry_url)
    return render_cluster(cc, gpu=gpu, options=opts)


def render_cluster(
    cc: ClusterConfig, *, gpu: bool, options: RenderOptions | None = None
) -> list[dict]:
    """:func:`render` for a config already rewritten by :func:`cluster_config` (same ``gpu``)."""
    opts = options or RenderOptions()
    image = opts.image_cuda if gpu else opts.image_cpu
    if cc.project_files and image == RenderOptions.model_fields["image_cuda" if gpu else "image_cpu"].default:
        raise ConfigError(
            f"{', '.join(cc.project_files)} name files of your project, which the stock image {image} does not "
            f"hold: build an image FROM {image} that copies your project to {PROJECT_DIR} and render with "
            "--image (docs/kubernetes.md, your own project)"
        )
    return [state_claim(opts), ray_service(cc, opts, gpu=gpu)]


# --------------------------------------------------------------------------- YAML


def dump_yaml(data) -> str:
    """YAML with multi-line strings as literal blocks (``|``), keys in insertion order."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True)


def to_yaml(objects: list[dict]) -> str:
    """A multi-document YAML stream (``kubectl apply -f -``)."""
    return "---\n".join(dump_yaml(o) for o in objects)
