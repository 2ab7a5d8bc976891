"""Every rendered manifest and every manifest in k8s/ validates, and runs the config it came from."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from coe.config import load_config
from coe.paths import REPO_ROOT
from coe.tools.k8s import RenderOptions, render
from coe.tools.k8s.cluster_config import ADAPTERS_DIR, APP_DIR, REGISTRY_PATH, cluster_config
from coe.tools.k8s.kustomize import build
from coe.tools.k8s.manifests import IMPORT_PATH, RAY_VERSION
from coe.tools.k8s.validate import validate_objects, validate_serve_config
from tests.k8s.conftest import portable

K8S = REPO_ROOT / "k8s"
TARGETS = {"base": False, "overlays/cpu": False, "overlays/gpu": True}


def _ray_service(objects: list[dict]) -> dict:
    (rs,) = [o for o in objects if o["kind"] == "RayService"]
    return rs


def _app(rs: dict) -> dict:
    (app,) = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    return app


@pytest.mark.parametrize("target", list(TARGETS))
def test_k8s_tree_validates(target, crd_dir, kubectl):
    objects = build(K8S / target)
    assert {o["kind"] for o in objects} == {"PersistentVolumeClaim", "RayService"}
    validate_objects(objects, crd_dir)


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-target", "gpu-target"])
def test_rendered_default_validates(gpu, crd_dir, default_config):
    validate_objects(render(default_config, gpu=gpu), crd_dir)


@pytest.mark.parametrize("target", list(TARGETS))
def test_overlays_are_the_renders_of_the_default_config(target, default_config, kubectl):
    """kubectl apply -k k8s/overlays/X applies exactly what `coe k8s render [--gpu]` writes."""
    assert build(K8S / target) == render(default_config, gpu=TARGETS[target])


def test_committed_tree_is_current():
    from coe.tools.k8s.tree import K8S_DIR, expected_tree

    stale = [rel for rel, text in expected_tree().items() if (K8S_DIR / rel).read_text() != text]
    assert not stale, f"k8s/ is stale ({stale}); regenerate with `python -m coe.tools.k8s.tree`"


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-target", "gpu-target"])
def test_serve_config_runs_the_same_config(gpu, default_config):
    rs = _ray_service(render(default_config, gpu=gpu))
    (inline,) = validate_serve_config(rs)
    original = load_config(default_config)
    app = _app(rs)
    assert app["import_path"] == IMPORT_PATH and app["route_prefix"] == "/"
    assert [e.id for e in inline.experts] == [e.id for e in original.experts]
    assert inline.router.model_dump(exclude={"fitted"}) == original.router.model_dump(exclude={"fitted"})
    if original.router.fitted is not None:  # the fitted router ships in the image, under /app
        rel = Path(original.router.fitted).resolve().relative_to(REPO_ROOT)
        assert inline.router.fitted == str(APP_DIR / rel.as_posix())
    for mine, theirs in zip(inline.experts, original.experts):
        assert mine.kind == theirs.kind and mine.description == theirs.description
        if mine.kind == "model":
            assert mine.engine == theirs.engine and mine.model == theirs.model
            assert mine.resources.num_gpus == (1 if gpu else 0)
            assert mine.resources.num_cpus == theirs.resources.num_cpus
        if mine.kind == "lora":
            # ../adapters/experts/math relative to configs/ -> the same folder in the image
            rel = (default_config.parent / theirs.adapter).resolve().relative_to(REPO_ROOT)
            assert mine.adapter == str(APP_DIR / rel.as_posix())
    assert inline.serving.registry_path == str(REGISTRY_PATH)
    assert str(ADAPTERS_DIR) in inline.serving.adapter_roots
    assert inline.serving.admin_key is None and inline.serving.admin_key_env == "COE_ADMIN_KEY"
    assert inline.serving.api_key is None and inline.serving.api_key_env == "COE_API_KEY"


def test_import_path_imports_and_accepts_the_rendered_args(default_config):
    module, _, attr = IMPORT_PATH.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert callable(builder)
    from coe.serving.app import load_app_config  # the builder's own argument parsing, no Ray

    args = _app(_ray_service(render(default_config)))["args"]
    config, base_dir = load_app_config(args)
    assert config == cluster_config(default_config).config
    assert str(base_dir) == str(APP_DIR)


def test_cluster_wiring(default_config):
    """Admin and chat keys from Secrets, state volume everywhere, readiness on /readyz, sized pods."""
    objects = render(
        default_config, gpu=True, options=RenderOptions(name="coe2", storage_class="nfs")
    )
    pvc, rs = objects
    assert pvc["spec"]["storageClassName"] == "nfs" and pvc["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == RAY_VERSION and cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert rs["spec"]["excludeHeadPodFromServeSvc"] is True
    assert rs["spec"]["serveService"]["spec"]["ports"][0]["port"] == 8000
    pods = [cluster["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        (c,) = pod["containers"]
        assert c["image"] == "coe:0.1.0-cuda"
        assert c["env"] == [
            {
                "name": "COE_ADMIN_KEY",
                "valueFrom": {"secretKeyRef": {"name": "coe-admin", "key": "admin-key"}},
            },
            {  # optional: without the Secret, chat is open
                "name": "COE_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "coe-api", "key": "api-key", "optional": True}},
            },
            # read by Serve's HTTP proxy on each node (serving/deployments/spec.py PROXY_ENV)
            {"name": "RAY_SERVE_PROXY_USE_GRPC", "value": "1"},
            {"name": "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "value": "0"},
        ]
        assert c["volumeMounts"] == [{"name": "coe-state", "mountPath": "/var/lib/coe"}]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "coe2-state"
        assert c["resources"]["requests"] == c["resources"]["limits"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for g in groups.values():
        probe = g["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe["httpGet"] == {"path": "/readyz", "port": 8000}
        assert 1 <= g["minReplicas"] == g["replicas"] <= g["maxReplicas"]
    gpu_pod = groups["gpu-workers"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    # two model experts with one GPU each: two GPU pods to start, one spare for runtime models
    assert (groups["gpu-workers"]["minReplicas"], groups["gpu-workers"]["maxReplicas"]) == (2, 3)
    assert (
        "nvidia.com/gpu"
        not in groups["cpu-workers"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )


def test_key_envs_follow_the_config(tmp_path, default_config):
    text = default_config.read_text().replace(
        "  port: 8000\n", "  port: 8100\n  admin_key_env: MY_KEY\n  api_key_env: MY_CHAT_KEY\n"
    )
    cfg = tmp_path / "configs" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text(portable(text))
    _, rs = render(cfg)
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]
    assert [e["name"] for e in worker["env"] if "valueFrom" in e] == ["MY_KEY", "MY_CHAT_KEY"]
    assert worker["readinessProbe"]["httpGet"]["port"] == 8100
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["http_options"]["port"] == 8100


def test_haproxy_ingress_is_set_on_every_ray_container(tmp_path, default_config):
    """``serving.proxy: haproxy`` puts Serve's HAProxy switch in the head's and every worker's
    environment (HAProxy runs on each node), with the default paths and ports: a pod is its own
    network namespace. The default (``ray``) does not."""
    text = default_config.read_text().replace("  port: 8000\n", "  port: 8000\n  proxy: haproxy\n")
    assert "proxy: haproxy" in text
    cfg = tmp_path / "configs" / "c.yaml"
    cfg.parent.mkdir()
    cfg.write_text(portable(text))

    def containers(path):
        cluster = render(path)[1]["spec"]["rayClusterConfig"]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [g["template"]["spec"]["containers"][0] for g in groups]

    for c in containers(cfg):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_PROXY_USE_GRPC"] == "1"
        assert not any(k.startswith("RAY_SERVE_HAPROXY_") for k in env)
    for c in containers(default_config):
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in {e["name"] for e in c["env"]}
