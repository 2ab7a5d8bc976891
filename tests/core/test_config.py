"""The config schema: the default validates; malformed configs name the field, value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from coe.config import CoEConfig, config_json_schema, load_config, parse_config
from coe.errors import ConfigError, ExpertNotFoundError
from coe.paths import default_config_path

MINIMAL = {"experts": [{"id": "base", "kind": "model", "model": "smollm2-135m-instruct"}]}


def with_experts(*extra):
    return {"experts": MINIMAL["experts"] + list(extra)}


def test_default_config_validates_and_resolves_paths():
    cfg = load_config()
    assert {e.kind for e in cfg.experts} >= {"model", "lora"}
    lora = next(e for e in cfg.experts if e.kind == "lora")
    assert Path(lora.adapter).is_absolute()
    assert Path(lora.adapter).parent == (default_config_path().parent.parent / "adapters" / "experts").resolve()
    assert cfg.serving.adapter_roots and all(Path(r).is_absolute() for r in cfg.serving.adapter_roots)


def test_defaults_fill_in():
    cfg = parse_config(MINIMAL)
    assert cfg.experts[0].engine.kind == "vllm"
    assert cfg.router.name == "centroid"
    assert cfg.serving.batching.max_batch_size >= 1


@pytest.mark.parametrize(
    "data, fragments",
    [
        ({"experts": [{"id": "x", "kind": "model", "model": "m", "colour": "red"}]}, ["colour", "Extra inputs"]),
        ({"experts": [{"id": "x", "kind": "gpu", "model": "m"}]}, ["kind", "'gpu'", "model", "lora", "mixture"]),
        ({"experts": [{"id": "x", "kind": "model", "model": "m", "engine": {"kind": "tgi"}}]}, ["engine.kind", "'tgi'", "hf", "vllm"]),
        ({"experts": [{"id": "x", "kind": "model", "model": "m", "engine": {"max_model_len": 0}}]}, ["max_model_len", "greater than or equal to 32"]),
        ({"experts": [{"id": "bad id!", "kind": "model", "model": "m"}]}, ["id", "bad id!"]),
        ({"experts": []}, ["experts", "at least 1"]),
        (with_experts({"id": "l", "kind": "lora", "base": "nope", "adapter": "/a"}), ["experts[l].base", "'nope'", "base"]),
        (with_experts({"id": "base", "kind": "model", "model": "m"}), ["unique", "base"]),
        ({**MINIMAL, "router": {"default_expert": "ghost"}}, ["router.default_expert", "ghost", "base"]),
        ({**MINIMAL, "serving": {"port": 70000}}, ["serving.port", "70000"]),
        ({"experts": [{"id": "x", "kind": "model", "model": "m", "engine": {"nice": 20}}]}, ["engine.nice", "less than or equal to 19"]),
        ({"experts": [{"id": "x", "kind": "model", "model": "m", "engine": {"nice": -5}}]}, ["engine.nice", "greater than or equal to 0"]),
        (with_experts({"id": "m", "kind": "mixture", "base": "base", "adapters": ["base"]}), ["adapters", "'base'"]),
    ],
)
def test_bad_configs_name_field_value_and_allowed(data, fragments):
    with pytest.raises(ConfigError) as err:
        parse_config(data, source="test.yaml")
    msg = str(err.value)
    assert "test.yaml" in msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_relative_paths_resolve_against_config_folder(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    data = with_experts({"id": "l", "kind": "lora", "base": "base", "adapter": "../ad/x"})
    data["experts"][0]["model"] = "./local-model"
    (sub / "c.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(sub / "c.yaml")
    assert cfg.expert("l").adapter == str((tmp_path / "ad" / "x").resolve())
    assert cfg.expert("base").model == str((sub / "local-model").resolve())


def test_expert_lookup_lists_available():
    cfg = parse_config(MINIMAL)
    with pytest.raises(ExpertNotFoundError, match="available: base"):
        cfg.expert("nope")


def test_json_schema_documents_fields():
    schema = config_json_schema()
    text = json.dumps(schema)
    assert "Expert id" in text and "max_batch_size" in text
    assert CoEConfig.model_json_schema() == schema


@pytest.mark.parametrize("field", ["admin_key", "api_key"])
@pytest.mark.parametrize("env", [None, "MY_KEY"])
def test_inline_key_is_refused_pointing_to_the_environment_without_echoing_it(tmp_path, field, env):
    default_env = {"admin_key": "COE_ADMIN_KEY", "api_key": "COE_API_KEY"}[field]
    serving = {field: "s3cret-inline-key", **({f"{field}_env": env} if env else {})}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "serving": serving}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert f"serving.{field} is set inline" in msg and f"environment variable {env or default_env}" in msg
    assert "s3cret-inline-key" not in msg and "value not shown" in msg
    # the key from the environment is what a config without it means (nothing else to set)
    assert getattr(parse_config({**MINIMAL, "serving": {f"{field}_env": "MY_KEY"}}).serving, field) is None
