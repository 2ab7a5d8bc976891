"""The SQLite expert registry and the app builder's config loading (no Ray started)."""

from __future__ import annotations

import sys

import pytest

from coe.config import LoraExpert, ModelExpert, parse_config
from coe.errors import ConfigError, DuplicateExpertError, ExpertNotFoundError
from coe.registry import ExpertRegistry, live_experts, registry_path
from coe.registry_schema import LATEST


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


def test_legacy_file_is_migrated_and_newer_schema_refused(tmp_path):
    """A registry file written before versioned migrations keeps its experts; a file from a
    newer coe is refused instead of being misread."""
    import sqlite3

    legacy = tmp_path / "old.sqlite"
    body = '{"id": "l", "kind": "lora", "base": "base", "adapter": "/x"}'
    with sqlite3.connect(legacy) as db:
        db.execute("CREATE TABLE experts (id TEXT PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL, "
                   "created_at REAL NOT NULL)")
        db.execute("INSERT INTO experts VALUES ('l', 'lora', ?, 1.0)", (body,))
    reg = ExpertRegistry(legacy)
    assert reg.ids() == ["l"] and reg.revision() == 0
    reg.add(LoraExpert(id="l2", base="base", adapter="/y"))
    assert reg.revision() == 1
    with sqlite3.connect(legacy) as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(LATEST,)]
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ConfigError, match="schema version 99, newer than this coe knows"):
        ExpertRegistry(legacy)


def test_rows_keep_what_was_set_and_a_row_that_no_longer_validates_is_named(tmp_path):
    import sqlite3

    reg = ExpertRegistry(tmp_path / "r.sqlite")
    reg.add(ModelExpert(id="h", model="x", engine={"kind": "hf", "max_model_len": 256}))
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        (body,) = db.execute("SELECT body FROM experts").fetchone()
        assert '"max_model_len": 256' in body and "gpu_memory_utilization" not in body  # only what was set
        db.execute("UPDATE experts SET body = replace(body, '256', '-1')")
    with pytest.raises(ConfigError, match=r"(?s)registered expert .h. in .*r.sqlite is invalid.*max_model_len"):
        reg.list()


def test_registry_url_is_validated_and_never_echoed():
    with pytest.raises(ConfigError, match="contains a password") as err:
        _config(registry_url="postgresql://coe:hunter2@db:5432/coe")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="must be postgresql://USER@HOST"):
        _config(registry_url="mysql://coe@db/coe")
    with pytest.raises(ConfigError, match="not both"):
        _config(registry_path="r.sqlite", registry_url="postgresql://coe@db/coe")
    assert _config(registry_url="postgresql://coe@db:5432/coe").serving.registry_password_env == "COE_REGISTRY_PASSWORD"


def test_registration_defaults_give_runtime_models_the_configured_resources():
    from coe.registry import with_registration_defaults

    gpu = _config(registered_model_resources={"num_gpus": 1, "num_cpus": 2})
    plain = ModelExpert(id="m", model="x")
    placed = with_registration_defaults(plain, gpu)
    assert (placed.resources.num_gpus, placed.resources.num_cpus) == (1, 2)
    assert "resources" in placed.model_fields_set  # stored with the row, so a restart places it the same
    own = ModelExpert(id="m", model="x", resources={"num_cpus": 0.5})
    assert with_registration_defaults(own, gpu) == own  # what the registration says wins
    lora = LoraExpert(id="l", base="base", adapter="/a")
    assert with_registration_defaults(lora, gpu) == lora
    assert with_registration_defaults(plain, _config()) == plain  # unset: CPU defaults
