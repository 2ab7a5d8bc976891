"""The GPU check's steps, run one after another under one time budget; one JSON and one summary.

Started by ``bench/gpu_check.sh`` (which makes pydantic and ``coe.*`` importable on a bare GPU
machine); see that script for how to run it. Each step is a subprocess of this interpreter
through ``bench/checkout_import.py`` (so ``coe.*`` comes from the checkout), with its own
timeout and ``COE_BENCH_RESULTS`` pointing at a scratch folder; a failing step is recorded
(exit code, the end of its output) and the next one runs. Writes to ``--out``:

- ``gpu_check.json``: the header (command, machine, load before/after), every step's exit code,
  seconds and results (each benchmark's own JSON), and the targets met / missed;
- ``gpu_check.md``: the targets table, then every benchmark's own summary;
- ``gpu_check.log``: every step's output;
- ``pool_gpu_tests.xml``: the pytest JUnit report of ``tests/pool -m gpu``.

``--dry-run`` runs the same steps on the CPU with tiny shapes (a test runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import REPO, RunRecord, write_results

# the steps run with this interpreter and its isolation flags (-S / -I: no site, so no installed coe)
RUNNER = [sys.executable, *(["-S"] if sys.flags.no_site else []), *(["-I"] if sys.flags.isolated else []),
          str(REPO / "bench" / "checkout_import.py")]


@dataclass(frozen=True)
class Step:
    """One step: what it runs on the GPU and in the dry run, its time limit, what it covers."""

    name: str
    gpu: list[str]
    dry: list[str]
    timeout_s: int
    covers: str


POOL_TESTS = ["-m", "pytest", "tests/pool", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
STEPS = [
    Step("pool_gpu_tests", POOL_TESTS, POOL_TESTS, 150,
         "the CUDA tests of tests/pool (pinned host buffers, copy stream and events, prefetch)"),
    Step("swap_copy", ["bench/swap_copy.py", "--device", "cuda", "--preset", "qwen0.5b", "--dtype", "bfloat16",
                       "--repeats", "20", "--load-repeats", "5"],
         ["bench/swap_copy.py", "--device", "cpu", "--preset", "tiny", "--dtype", "float32", "--repeats", "3",
          "--load-repeats", "1"], 150, "pool swap vs plain copy vs from_pretrained at 0.5B"),
    Step("lora_mixed_batch", ["bench/lora_mixed_batch.py", "--device", "cuda", "--dtype", "bfloat16", "--preset",
                              "qwen0.5b", "--batch", "64", "--adapters", "8", "--prompt", "128", "--new", "64",
                              "--rounds", "3"],
         ["bench/lora_mixed_batch.py", "--preset", "tiny", "--batch", "8", "--adapters", "3", "--prompt", "8",
          "--new", "4", "--rounds", "2"], 200, "mixed multi-LoRA batch vs PEFT adapter_names, 0.5B, 8 adapters, batch 64"),
    Step("lora_xlora", ["bench/lora_xlora.py", "--device", "cuda", "--dtype", "bfloat16", "--preset", "qwen0.5b",
                        "--adapters", "4", "--batch", "8", "--prompt", "128", "--new", "64", "--rounds", "3"],
         ["bench/lora_xlora.py", "--preset", "tiny", "--prompt", "8", "--new", "4", "--rounds", "2"], 150,
         "X-LoRA with two KV caches vs PEFT's X-LoRA (no cache), 0.5B, 4 adapters, batch 8"),
    Step("swap_sched", ["bench/swap_sched.py", "--device", "cuda", "--preset", "qwen0.5b", "--experts", "8",
                        "--resident", "2", "--requests", "64", "--rate", "40", "--max-tokens", "8", "--batch", "16"],
         ["bench/swap_sched.py", "--device", "cpu", "--preset", "tiny", "--experts", "3", "--resident", "1",
          "--requests", "8", "--rate", "50", "--max-tokens", "3", "--batch", "4"], 180,
         "largest_group vs fcfs, 8 experts of 0.5B (1 GB swaps), room for 2, 8 new tokens"),
]


def targets(steps: dict) -> list[dict]:
    """The issue's targets, each with its measured median and met / missed / not measured."""

    def get(step: str, *path):
        node = steps.get(step, {}).get("results")
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    rows = [
        ("mixed batch ≥ 0.70x base tokens/s (batch 64, 8 adapters)", get("lora_mixed_batch", "ratios", "ours_vs_base", "median"), 0.70),
        ("mixed batch ≥ 5x PEFT adapter_names", get("lora_mixed_batch", "ratios", "ours_vs_peft", "median"), 5.0),
        ("X-LoRA ≥ 5x PEFT's X-LoRA", get("lora_xlora", "speedup", "median"), 5.0),
        ("swap ≥ 0.80 of plain pinned copy bandwidth", get("swap_copy", "swap_vs_copy_bandwidth", "median"), 0.80),
        ("swap ≥ 20x faster than from_pretrained", get("swap_copy", "from_pretrained_vs_swap_speedup"), 20.0),
        ("largest_group / fcfs tokens/s (no target: reported)",
         get("swap_sched", "ratios_vs_fcfs", "largest_group", "tokens_per_s", "median"), None),
    ]
    out = []
    for what, value, target in rows:
        status = "not measured" if value is None else ("reported" if target is None else
                                                        ("met" if value >= target else "missed"))
        out.append({"target": what, "measured": value, "threshold": target, "status": status})
    return out


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped from a pytest JUnit file ({} when absent)."""
    if not path.is_file():
        return {}
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def run_step(step: Step, dry: bool, out: Path, scratch: Path, budget_end: float, log) -> dict:
    left = budget_end - time.monotonic()
    if left < 20:
        return {"status": "skipped", "reason": "the time budget ran out", "covers": step.covers}
    argv = list(step.dry if dry else step.gpu)
    if step.name == "pool_gpu_tests":
        argv += [f"--junitxml={out / 'pool_gpu_tests.xml'}"]
    folder = scratch / step.name
    env = dict(os.environ, COE_BENCH_RESULTS=str(folder), PYTHONUNBUFFERED="1")
    cmd = [*RUNNER, *argv]
    log.write(f"\n===== {step.name}: {' '.join(argv)}\n")
    log.flush()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=min(step.timeout_s, left), check=False)
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        rc, output = "timeout", (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
    seconds = round(time.monotonic() - t0, 1)
    log.write(output)
    log.write(f"\n===== {step.name}: exit {rc} after {seconds} s\n")
    log.flush()
    rec = {"status": "ok" if rc == 0 else "failed", "exit": rc, "seconds": seconds, "command": argv,
           "covers": step.covers}
    results = sorted(folder.glob("*.json"))
    if results:
        rec["results"] = json.loads(results[0].read_text())
        rec["summary_md"] = results[0].with_suffix(".md").read_text() if results[0].with_suffix(".md").is_file() else ""
    if step.name == "pool_gpu_tests":
        rec["tests"] = junit_counts(out / "pool_gpu_tests.xml")
    if rc != 0:
        rec["output_tail"] = output[-3000:]
    return rec


def markdown(rec: RunRecord, data: dict, dry: bool) -> str:
    title = "GPU check" + (" (dry run: CPU, tiny shapes — the figures mean nothing)" if dry else "")
    lines = [rec.markdown_header(title).rstrip(), "", "| step | status | seconds | covers |", "|---|---|---|---|"]
    for name, s in data["steps"].items():
        status = s["status"] + (f" (exit {s['exit']})" if s.get("exit") not in (None, 0) else "")
        if name == "pool_gpu_tests" and s.get("tests"):
            t = s["tests"]
            status += f": {t['tests']} tests, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
        lines.append(f"| {name} | {status} | {s.get('seconds', '')} | {s['covers']} |")
    lines += ["", "| target | measured (median) | status |", "|---|---|---|"]
    for t in data["targets"]:
        value = "" if t["measured"] is None else f"{t['measured']:.2f}"
        lines.append(f"| {t['target']} | {value} | {t['status']} |")
    for name, s in data["steps"].items():
        if s.get("summary_md"):
            lines += ["", "---", "", "#" + s["summary_md"] if s["summary_md"].startswith("# ") else s["summary_md"]]
        elif s.get("output_tail"):
            lines += ["", f"## {name}: exit {s.get('exit')}", "", "```", s["output_tail"][-1500:], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: proves the steps run")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results" / "gpu_check"))
    p.add_argument("--budget-s", type=float, default=450, help="all steps together (the machine gives 8 minutes)")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated subset, in order")
    args = p.parse_args(argv)
    rec = RunRecord.start(note="dry run on the CPU with tiny shapes" if args.dry_run else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.steps.split(",")
    unknown = sorted(set(wanted) - {s.name for s in STEPS})
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; allowed: {', '.join(s.name for s in STEPS)}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device: use --dry-run on a machine without a GPU")
    budget_end = time.monotonic() + args.budget_s
    steps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch, open(out / "gpu_check.log", "w") as log:
        for step in STEPS:
            if step.name in wanted:
                steps[step.name] = run_step(step, args.dry_run, out, Path(scratch), budget_end, log)
                print(f"{step.name}: {steps[step.name]['status']} ({steps[step.name].get('seconds', 0)} s)", flush=True)
    import torch  # the header reports torch and the GPU when torch is imported

    data = rec.finish({"dry_run": args.dry_run, "steps": steps})
    data["targets"] = targets(steps)
    data["ok"] = all(s["status"] == "ok" for s in steps.values())
    write_results("gpu_check", data, markdown(rec, data, args.dry_run), folder=out)
    print(markdown(rec, data, args.dry_run).split("\n---\n")[0])
    return data


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
