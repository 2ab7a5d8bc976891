"""Rendering for real clusters: a user's own project outside coe's tree, runtime models on the GPU
target, an external PostgreSQL registry through a Secret, and GCS fault tolerance (Redis)."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from coe.errors import ConfigError
from coe.paths import REPO_ROOT
from coe.tools.cli import main
from coe.tools.k8s import RenderOptions, render
from coe.tools.k8s.cluster_config import PROJECT_DIR, REGISTRY_PATH, cluster_config
from coe.tools.k8s.validate import validate_objects, validate_serve_config
from tests.k8s.conftest import portable


def _project(tmp_path, *, nested: bool = False):
    """A user's project: their config and their own LoRA adapter, outside coe's repository."""
    project = tmp_path / "my-project"
    (project / "adapters").mkdir(parents=True)
    shutil.copytree(REPO_ROOT / "adapters" / "experts" / "math", project / "adapters" / "mine")
    folder = project / "configs" if nested else project
    folder.mkdir(exist_ok=True)
    rel = "../adapters/mine" if nested else "./adapters/mine"
    config = folder / "coe.yaml"
    config.write_text(
        "router: {name: centroid, default_expert: base}\n"
        "experts:\n"
        "  - {id: base, kind: model, model: smollm2-135m-instruct, engine: {kind: vllm}}\n"
        f"  - {{id: mine, kind: lora, base: base, adapter: {rel}, description: my math}}\n"
    )
    return project, config


def _rs(objects):
    (rs,) = [o for o in objects if o["kind"] == "RayService"]
    return rs


def _containers(rs):
    cluster = rs["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    return [c for g in pods for c in g["template"]["spec"]["containers"]]


def test_a_users_project_renders_with_their_image(tmp_path, crd_dir):
    from coe.serving.app import load_app_config

    _, config = _project(tmp_path)
    with pytest.raises(ConfigError, match=r"experts\[1\] \(mine\)\.adapter name files of your project.*FROM coe:0.1.0-cpu"):
        render(config)  # the stock image does not hold the user's adapter
    objects = render(config, options=RenderOptions(image_cpu="registry.example/me/coe-mine:1"))
    validate_objects(objects, crd_dir)
    (inline,) = validate_serve_config(_rs(objects))
    assert inline.expert("mine").adapter == f"{PROJECT_DIR}/adapters/mine"
    assert inline.expert("base").model == "smollm2-135m-instruct"  # built-in aliases are in the coe image
    (app,) = yaml.safe_load(_rs(objects)["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["base_dir"] == str(PROJECT_DIR)
    parsed, base = load_app_config(app["args"])  # the builder accepts what was rendered
    assert parsed == inline and str(base) == str(PROJECT_DIR)
    assert {c["image"] for c in _containers(_rs(objects))} == {"registry.example/me/coe-mine:1"}


def test_project_folder_can_be_above_the_config(tmp_path):
    project, config = _project(tmp_path, nested=True)
    with pytest.raises(ConfigError, match=r"outside the repository.*--project DIR"):
        cluster_config(config)  # default project: the config's folder, which does not hold ../adapters
    cc = cluster_config(config, project=project)
    assert cc.config.expert("mine").adapter == f"{PROJECT_DIR}/adapters/mine"
    assert cc.base_dir == f"{PROJECT_DIR}/configs" and cc.project_files == ["experts[1] (mine).adapter"]
    with pytest.raises(ConfigError, match="not a folder"):
        cluster_config(config, project=tmp_path / "nope")


def test_cli_renders_a_users_project_and_kustomize_builds_it(tmp_path, capsys, crd_dir, kubectl):
    project, config = _project(tmp_path, nested=True)
    out = tmp_path / "deploy"
    args = ["k8s", "render", "--config", str(config), "--project", str(project), "--out", str(out)]
    assert main(args) == 2
    assert "FROM coe:0.1.0-cpu" in capsys.readouterr().err
    assert main([*args, "--image", "me/coe-mine:1"]) == 0
    assert main(["k8s", "validate", str(out), "--crds", str(crd_dir)]) == 0
    assert "RayService/coe" in capsys.readouterr().out


def test_readme_shows_the_image_the_render_expects():
    """The README's Dockerfile for a user's project builds FROM the coe image and copies the
    project where the renderer maps it."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"```dockerfile\n(FROM coe:[^\n]+\n.*?)```", text, flags=re.DOTALL)
    assert block, "README: a ```dockerfile block FROM the coe image"
    assert re.search(rf"^COPY (--chown=\S+ )?\. {PROJECT_DIR}$", block.group(1), flags=re.MULTILINE)


def test_runtime_models_get_a_gpu_on_the_gpu_target(default_config, tmp_path):
    gpu = cluster_config(default_config, gpu=True).config.serving.registered_model_resources
    assert gpu is not None and gpu.num_gpus == 1
    assert cluster_config(default_config).config.serving.registered_model_resources is None
    text = portable(default_config.read_text())
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("serving:\n", "serving:\n  registered_model_resources: {num_gpus: 2}\n", 1))
    assert cluster_config(path, gpu=True).config.serving.registered_model_resources.num_gpus == 2
    with pytest.raises(ConfigError, match=r"registered_model_resources.num_gpus is set.*--gpu"):
        cluster_config(path)


def test_external_registry_through_a_secret(default_config, crd_dir):
    opts = RenderOptions(registry_url="postgresql://coe@db.example:5432/coe", registry_secret="db-pw",
                         registry_secret_key="pw")
    objects = render(default_config, gpu=True, options=opts)
    validate_objects(objects, crd_dir)
    (inline,) = validate_serve_config(_rs(objects))
    assert inline.serving.registry_url == "postgresql://coe@db.example:5432/coe"
    assert inline.serving.registry_path is None and str(REGISTRY_PATH) not in _rs(objects)["spec"]["serveConfigV2"]
    for c in _containers(_rs(objects)):  # every Ray container: ingress replicas may run on any pod
        assert {"name": "COE_REGISTRY_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db-pw", "key": "pw"}}} in c["env"]
    default_env = _containers(_rs(render(default_config)))[0]["env"]
    # SQLite on the volume: no database secret (only the admin and the chat key)
    assert [e["name"] for e in default_env if "valueFrom" in e] == ["COE_ADMIN_KEY", "COE_API_KEY"]


def test_external_registry_bad_input(default_config, tmp_path, capsys):
    with pytest.raises(ConfigError, match="contains a password") as err:
        render(default_config, options=RenderOptions(registry_url="postgresql://coe:hunter2@db/coe"))
    assert "hunter2" not in str(err.value)
    base = ["k8s", "render", "--config", str(default_config)]
    assert main([*base, "--registry-url", "mysql://coe@db/coe"]) == 2
    assert "registry_url" in capsys.readouterr().err
    text = portable(default_config.read_text())
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("serving:\n", "serving:\n  registry_path: /var/lib/coe/r.sqlite\n", 1))
    with pytest.raises(ConfigError, match="registry_path is set and --registry-url"):
        cluster_config(path, registry_url="postgresql://coe@db/coe")


def test_gcs_fault_tolerance_with_external_redis(default_config, crd_dir, capsys):
    assert main(["k8s", "render", "--config", str(default_config), "--gcs-redis", "redis.ha:6379",
                 "--gcs-redis-secret", "redis-auth:pw"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    validate_objects(objects, crd_dir)
    assert _rs(objects)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.ha:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-auth", "key": "pw"}}},
    }
    assert "gcsFaultToleranceOptions" not in _rs(render(default_config))["spec"]["rayClusterConfig"]
    plain = RenderOptions(gcs_redis_address="redis:6379")
    assert _rs(render(default_config, options=plain))["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis:6379"}
    base = ["k8s", "render", "--config", str(default_config)]
    assert main([*base, "--gcs-redis", "redis"]) == 2  # no port
    assert "gcs_redis_address" in capsys.readouterr().err
    assert main([*base, "--gcs-redis-secret", "redis-auth"]) == 2
    assert "without gcs_redis_address" in capsys.readouterr().err
