"""The checks can fail: bad manifests, bad configs and bad patches are refused with clear errors."""

from __future__ import annotations

import copy
import math
import re

import pytest
import yaml

from coe.config import load_config
from coe.errors import ConfigError
from coe.paths import REPO_ROOT
from coe.tools.k8s import render
from coe.tools.k8s.kustomize import build, diff_json6902
from coe.tools.k8s.sizing import Unit, size_groups, units
from coe.tools.k8s.validate import ManifestError, validate_objects
from tests.k8s.conftest import portable

DOCKER = REPO_ROOT / "k8s" / "docker"


@pytest.fixture(scope="module")
def good(default_config):
    return render(default_config, gpu=True)


def _broken(objects, edit):
    objects = copy.deepcopy(objects)
    edit(objects)
    return objects


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda o: o[1]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
            "groupName",
        ),
        (
            lambda o: o[1]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(minReplica=1),
            "minReplica",
        ),
        (
            lambda o: o[1]["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling="yes"),
            "enableInTreeAutoscaling",
        ),
        (
            lambda o: o[1]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
                "containers"
            ][0].update(imagePullPolicy=3),
            "imagePullPolicy",
        ),
        (lambda o: o[0]["spec"].update(accessModes="ReadWriteMany"), "accessModes"),
        (lambda o: o[1]["spec"]["serveService"]["spec"].update(port=8000), "port"),
    ],
    ids=[
        "missing-groupName",
        "typo-minReplica",
        "bool-as-string",
        "pod-template-field",
        "pvc-field",
        "service",
    ],
)
def test_invalid_manifests_are_refused(good, crd_dir, edit, message):
    with pytest.raises(ManifestError, match=message):
        validate_objects(_broken(good, edit), crd_dir, serve=False)


def _set_serve(objects, text):
    objects[1]["spec"]["serveConfigV2"] = text


def test_invalid_serve_configs_are_refused(good, crd_dir):
    serve = yaml.safe_load(good[1]["spec"]["serveConfigV2"])
    bad_ray = copy.deepcopy(serve)
    bad_ray["applications"][0]["deployments"] = [{"name": "x", "num_replicas": "many"}]
    with pytest.raises(ManifestError, match="not a valid Ray Serve config"):
        validate_objects(_broken(good, lambda o: _set_serve(o, yaml.safe_dump(bad_ray))), crd_dir)
    bad_coe = copy.deepcopy(serve)
    bad_coe["applications"][0]["args"]["config_yaml"] = "version: 1\nexperts: []\n"
    with pytest.raises(ManifestError, match="experts"):
        validate_objects(_broken(good, lambda o: _set_serve(o, yaml.safe_dump(bad_coe))), crd_dir)


def _config(tmp_path, default_config, **replace) -> str:
    text = portable(default_config.read_text())
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("field, env", [("admin_key", "COE_ADMIN_KEY"), ("api_key", "COE_API_KEY")])
def test_render_refuses_inline_keys(tmp_path, default_config, field, env):
    path = _config(
        tmp_path, default_config, **{"  port: 8000\n": f"  port: 8000\n  {field}: s3cret\n"}
    )
    with pytest.raises(ConfigError, match=f"{field} is set inline.*{env}"):
        render(path)


def test_render_refuses_paths_outside_the_image(tmp_path, tmp_path_factory, default_config):
    outside = tmp_path_factory.mktemp("elsewhere") / "my-adapter"  # neither in coe nor in the project
    outside.mkdir()
    path = _config(
        tmp_path, default_config, **{str(REPO_ROOT / "adapters/experts/math"): str(outside)}
    )
    with pytest.raises(
        ConfigError, match=r"experts\[1\] \(smollm2-math\)\.adapter .*outside the repository.*--project"
    ):
        render(path)
    state = _config(
        tmp_path,
        default_config,
        **{str(REPO_ROOT / "adapters/experts/math"): "/var/lib/coe/adapters/m"},
    )
    assert "/var/lib/coe/adapters/m" in render(state)[1]["spec"]["serveConfigV2"]


def test_cpu_render_refuses_gpu_experts(tmp_path, default_config):
    path = _config(
        tmp_path,
        default_config,
        **{"resources: {num_cpus: 1}": "resources: {num_cpus: 1, num_gpus: 1}"},
    )
    with pytest.raises(ConfigError, match=r"num_gpus is 1.*--gpu"):
        render(path)
    groups = render(path, gpu=True)[1]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["cpu-workers", "gpu-workers"]


def test_invalid_config_fails_like_coe_serve(tmp_path, default_config):
    path = _config(tmp_path, default_config, **{"base: smollm2\n": "base: nosuch\n"})
    with pytest.raises(ConfigError, match="must name a `model` expert"):
        render(path)


def test_units_are_the_builders_deployments(default_config):
    """Sizing counts exactly the deployments coe.serving.app builds, with their resources."""
    from coe.serving.deployments.spec import plan_servers

    cfg = load_config(default_config)
    specs = plan_servers(cfg.experts, base_dir=None, batching=cfg.serving.batching)
    expected = {"coe-ingress": cfg.serving.ingress} | {sid: s.resources for sid, s in specs.items()}
    got = {u.name: u for u in units(cfg)}
    assert set(got) == set(expected)
    for name, res in expected.items():
        assert (got[name].cpus, got[name].gpus, got[name].memory_gib) == (
            res.num_cpus,
            res.num_gpus,
            res.memory_gib,
        )


def test_autoscaling_bounds_size_the_worker_group(tmp_path, default_config):
    auto = "resources: {num_cpus: 1, num_gpus: 0.5, memory_gib: 12, autoscaling: {min_replicas: 1, max_replicas: 6}}"
    path = _config(tmp_path, default_config, **{"resources: {num_cpus: 1}": auto})
    from coe.tools.k8s.cluster_config import cluster_config

    (cpu, gpu) = size_groups(cluster_config(path, gpu=True).config, gpu=True)
    smol = next(u for u in gpu.units if u.name == "expert-smollm2")
    assert (smol.min_replicas, smol.max_replicas, smol.memory_gib) == (1, 6, 12)
    assert gpu.shape.gpus == 1 and gpu.shape.memory_gib >= 14
    # two replicas of smollm2 (0.5 GPU, 12 GiB) fit one 32 GiB GPU pod; qwen-coder needs its own
    assert gpu.shape.fits(smol) == 2
    assert gpu.min_replicas == 2  # 0.5 + 1 GPU at minimum, rounded up
    assert gpu.max_replicas == math.ceil(6 / 2) + 1 + 1  # smollm2, qwen-coder, one spare
    assert cpu.min_replicas == 1 and cpu.units[0].name == "coe-ingress"


def test_unit_fit_counts_every_resource():
    from coe.tools.k8s.sizing import PodShape

    u = Unit("x", "expert", cpus=2, gpus=0, memory_gib=None, min_replicas=0, max_replicas=3)
    assert PodShape(cpus=5, gpus=0, memory_gib=16).fits(u) == 2  # 4 usable CPUs
    assert PodShape(cpus=64, gpus=0, memory_gib=10).fits(u) == 2  # 8 usable GiB / 4 GiB default


def test_overlay_patches_round_trip_through_real_kustomize(tmp_path, kubectl):
    """What diff_json6902 writes, `kubectl kustomize` applies back: removals, replacements,
    additions, list growth and shrinkage, and keys that need JSON-pointer escaping."""
    old = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "a"},
           "spec": {"b": [1, 2, 3], "c": "x", "g": [{"k": 1}], "d": 1}}
    new = {"apiVersion": "example.com/v1", "kind": "Thing", "metadata": {"name": "a"},
           "spec": {"b": [1, 5], "e/f~": True, "g": [{"k": 1}, {"k": 2}], "d": 1}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(diff_json6902(old, new)))
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["a.yaml"],
        "patches": [{"path": "p.yaml", "target": {"group": "example.com", "version": "v1", "kind": "Thing", "name": "a"}}],
    }))
    assert build(tmp_path) == [new]


def test_kustomize_failures_are_config_errors(tmp_path, kubectl, monkeypatch):
    (tmp_path / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    with pytest.raises(ConfigError, match=r"kubectl kustomize .* failed: .*missing.yaml"):
        build(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="kubectl is not on PATH"):
        build(tmp_path)


def _readme_steps() -> list[str]:
    """The README's numbered set-up commands (`1. \\`python3.11 -m venv .venv\\`` ...)."""
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"^\d\. `([^`]+)`", text, flags=re.MULTILINE)


@pytest.mark.parametrize("kind, extra", [("cpu", "cpu"), ("cuda", "gpu")])
def test_dockerfiles_install_as_the_readme_does(kind, extra):
    from coe.tools.k8s.manifests import RAY_VERSION

    text = (DOCKER / f"Dockerfile.{kind}").read_text()
    runs = " ".join(
        re.findall(r"^RUN (.+?)(?<!\\)$", text.replace("\\\n", " "), flags=re.MULTILINE)
    )
    steps = _readme_steps()
    assert len(steps) == 4, steps
    venv, install, uninstall, prepare = steps
    assert venv in runs and prepare in runs
    assert install.replace("[cpu,dev]", f"[{extra},dev]") in runs
    assert (uninstall in runs) == (kind == "cpu")  # the CUDA build keeps them
    assert f"ARG RAY_VERSION={RAY_VERSION}" in text and "-py311-" in text
    assert "PATH=/app/.venv/bin:" in text  # KubeRay's `ray start` must be the venv's Ray
    assert (DOCKER / f"Dockerfile.{kind}.dockerignore").read_text().count(".venv") == 1


def test_ray_version_matches_the_installed_ray():
    from importlib.metadata import version

    from coe.tools.k8s.manifests import RAY_VERSION

    assert version("ray") == RAY_VERSION
