"""The GPU check: the import shim works without an install, the targets table is right, and
the dry run (the same steps on the CPU, tiny shapes) passes in a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from bench.gpu_check import STEPS, targets

ROOT = Path(__file__).resolve().parents[2]


def _clean_env() -> dict:
    """``python -S`` sees only site-packages on PYTHONPATH: no .pth files, so no editable coe."""
    return dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"], PYTHONNOUSERSITE="1")


def test_checkout_import_maps_the_coe_namespace_without_an_install(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys, coe.serving.pool.pool, coe.adapters.multilora, coe.config\n"
        "print(coe.__file__); print(coe.serving.__file__); print(coe.adapters.multilora.__file__)\n"
        "print(any('editable' in type(f).__module__ for f in sys.meta_path))\n"
    )
    no_shim = subprocess.run([sys.executable, "-S", "-c", "import coe.serving"], cwd=tmp_path, env=_clean_env(),
                             capture_output=True, text=True, check=False)
    assert no_shim.returncode != 0  # the clean environment really has no coe
    out = subprocess.run([sys.executable, "-S", str(ROOT / "bench" / "checkout_import.py"), str(probe)], cwd=tmp_path,
                         env=_clean_env(), capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == [str(ROOT / "coe" / "__init__.py"), str(ROOT / "serving" / "__init__.py"),
                       str(ROOT / "adapters" / "multilora.py")]
    assert out[3] == "False"


def test_targets_say_met_missed_or_not_measured():
    steps = {
        "lora_mixed_batch": {"results": {"ratios": {"ours_vs_base": {"median": 0.8}, "ours_vs_peft": {"median": 3.0}}}},
        "swap_copy": {"results": {"swap_vs_copy_bandwidth": {"median": 0.95}, "from_pretrained_vs_swap_speedup": 25.0}},
    }
    status = {t["target"].split(" ")[0] + str(t["threshold"]): t["status"] for t in targets(steps)}
    assert status == {"mixed0.7": "met", "mixed5.0": "missed", "X-LoRA5.0": "not measured", "swap0.8": "met",
                      "swap20.0": "met", "largest_groupNone": "not measured"}


def test_every_step_has_a_gpu_and_a_dry_command():
    names = [s.name for s in STEPS]
    assert names[0] == "pool_gpu_tests" and len(set(names)) == len(names)
    for s in STEPS[1:]:
        assert "cuda" in s.gpu and "cuda" not in s.dry and "tiny" in s.dry
    assert sum(s.timeout_s for s in STEPS) > 450  # the shared budget, not the sum, bounds the run


@pytest.mark.slow
def test_dry_run_passes_in_a_clean_environment(tmp_path):
    env = dict(_clean_env(), PYTHON=f"{sys.executable} -S", OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--budget-s", "240"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=420, check=False)
    log = (tmp_path / "gpu_check.log").read_text() if (tmp_path / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["ok"] and data["dry_run"]
    assert set(data["steps"]) == {s.name for s in STEPS}
    assert data["steps"]["pool_gpu_tests"]["tests"]["tests"] >= 2  # the CUDA tests were collected (and skipped)
    assert all("results" in s for n, s in data["steps"].items() if n != "pool_gpu_tests")
    assert {t["status"] for t in data["targets"]} <= {"met", "missed", "reported"}
    assert data["run"]["load_before"] and data["run"]["load_after"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check (dry run")
