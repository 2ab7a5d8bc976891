"""`coe k8s render` and `coe k8s validate` from the command line."""

from __future__ import annotations

import yaml

from coe.tools.cli import main
from coe.tools.k8s import render


def test_render_to_stdout_is_the_render(capsys, default_config):
    assert main(["k8s", "render", "--config", str(default_config)]) == 0
    out, err = capsys.readouterr()
    assert list(yaml.safe_load_all(out)) == render(default_config)
    assert "registry_path" in err  # the notes say what was rewritten for the cluster


def test_render_out_then_validate(tmp_path, capsys, crd_dir, default_config, kubectl):
    out = tmp_path / "deploy"
    args = [
        "k8s",
        "render",
        "--config",
        str(default_config),
        "--gpu",
        "--out",
        str(out),
        "--image",
        "reg/coe:1",
    ]
    assert main(args + ["--name", "coe-prod", "--storage-class", "nfs"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "kustomization.yaml",
        "rayservice.yaml",
        "state-pvc.yaml",
    ]
    assert (
        main(["k8s", "validate", str(out), str(out / "rayservice.yaml"), "--crds", str(crd_dir)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "RayService/coe-prod" in printed and "valid" in printed
    rs = yaml.safe_load((out / "rayservice.yaml").read_text())
    assert (
        rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "image"
        ]
        == "reg/coe:1"
    )


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, default_config):
    assert main(["k8s", "render", "--config", str(default_config), "--name", "Bad_Name"]) == 2
    assert "name" in capsys.readouterr().err
    assert main(["k8s", "render", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["k8s", "validate", str(tmp_path), "--crds", str(tmp_path)]) == 2
    assert "--crds" in capsys.readouterr().err
