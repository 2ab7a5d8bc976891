"""The CLI: commands register themselves; errors print cleanly with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

from coe.tools.cli import build_parser, main


def test_config_schema_and_validate(capsys, tmp_path):
    assert main(["config", "schema"]) == 0
    assert "experts" in json.loads(capsys.readouterr().out)["properties"]
    assert main(["config", "validate"]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts:\n  - {id: x, kind: model, model: m, engine: {kind: tgi}}\n")
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "engine.kind" in err and "tgi" in err
    # router.params are checked against the router's own parameter class (not by the core schema)
    bad.write_text("router: {name: knn, params: {kk: 3}}\nexperts:\n  - {id: x, kind: model, model: m}\n")
    assert main(["config", "validate", str(bad)]) == 2
    assert "router.params: router 'knn' params are invalid: kk" in capsys.readouterr().err


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "gemma3-270m" in out and "minilm-l6" in out


def test_commands_are_discovered():
    choices = build_parser()._subparsers._group_actions[0].choices
    assert {"config", "models"} <= set(choices)


def test_import_coe_is_light():
    code = "import sys, coe, coe.config, coe.tools.cli, coe.model_paths, coe.tools.models, coe.scoring, coe.serving.engines; print(sorted(m for m in ('torch','vllm','ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
