"""The SQLite expert registry and the app builder's config loading (no Ray started)."""

from __future__ import annotations

import sys

import pytest

from coe.config import LoraExpert, ModelExpert, parse_config
from coe.errors import ConfigError, DuplicateExpertError, ExpertNotFoundError
from coe.registry import ExpertRegistry, live_experts, registry_path


def _config(**serving):
    return parse_config({"experts": [{"id": "base", "kind": "model", "model": "x"}], "serving": serving})


def test_add_list_remove_persist(tmp_path):
    reg = ExpertRegistry(tmp_path / "r.sqlite")
    lora = LoraExpert(id="math", base="base", adapter="/a/math", description="math", examples=["1+1?"])
    model = ModelExpert(id="m2", model="smollm2-135m-instruct", engine={"kind": "hf"})
    reg.add(lora)
    reg.add(model)
    with pytest.raises(DuplicateExpertError):
        reg.add(lora)
    again = ExpertRegistry(tmp_path / "r.sqlite")  # a restart
    assert again.list() == [lora, model]
    assert again.get("m2").engine.kind == "hf"
    again.remove("math")
    with pytest.raises(ExpertNotFoundError, match="m2"):
        again.remove("math")
    assert [e.id for e in ExpertRegistry(tmp_path / "r.sqlite").list()] == ["m2"]


def test_live_experts_config_first_and_config_wins(tmp_path):
    config = _config()
    reg = ExpertRegistry(tmp_path / "r.sqlite")
    reg.add(ModelExpert(id="base", model="other"))  # clashes with the config: ignored
    reg.add(LoraExpert(id="l", base="base", adapter="/x"))
    assert [(e.id, getattr(e, "model", None)) for e in live_experts(config, reg)] == [("base", "x"), ("l", None)]


def test_registry_path_default_and_relative(tmp_path, monkeypatch):
    monkeypatch.setenv("COE_HOME", str(tmp_path / "home"))
    assert registry_path(_config()) == tmp_path / "home" / "registry.sqlite"
    assert registry_path(_config(registry_path="state/r.sqlite"), tmp_path) == tmp_path / "state" / "r.sqlite"


def test_unwritable_registry_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot be opened"):
        ExpertRegistry(tmp_path / "file" / "r.sqlite")


def test_app_module_imports_light_and_builder_args():
    from coe.serving import app

    config, base = app.load_app_config({"config_yaml": "experts: [{id: a, kind: model, model: m}]", "base_dir": "/tmp"})
    assert config.experts[0].id == "a" and str(base) == "/tmp"
    config, base = app.load_app_config({})
    assert base.name == "configs" and config.router.default_expert == "smollm2"
    with pytest.raises(ConfigError, match="config_path"):
        app.load_app_config({"nope": 1})
    with pytest.raises(ConfigError, match="experts"):
        app.load_app_config({"config_yaml": "experts: []"})


def test_importing_the_app_starts_no_ray():
    import subprocess

    code = "import coe.serving.app, sys; print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_registered_models_get_their_own_server_at_build_time(tmp_path):
    """What a restart deploys: config experts plus registered ones, one server per model."""
    from coe.config import BatchingConfig
    from coe.serving.deployments.spec import plan_servers

    reg = ExpertRegistry(tmp_path / "r.sqlite")
    reg.add(ModelExpert(id="m2", model="x2", resources={"num_cpus": 0.5}))
    reg.add(LoraExpert(id="l1", base="base", adapter="/a/l1"))
    reg.add(LoraExpert(id="l2", base="m2", adapter="/a/l2"))
    specs = plan_servers(live_experts(_config(), reg), base_dir=tmp_path, batching=BatchingConfig())
    assert list(specs) == ["expert-base", "expert-m2"]
    assert specs["expert-base"].expert_ids() == ["base", "l1"]
    assert specs["expert-m2"].expert_ids() == ["m2", "l2"] and specs["expert-m2"].resources.num_cpus == 0.5
