"""Shared parts of the serving benchmarks: three experts on SmolLM2, a mixed workload, results."""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

# A mixed workload: (expected expert, query). The service routes them itself; the bare
# engines get the same requests with these assignments.
QUERIES = {
    "smollm2": ["What is the capital of France?", "Give me three tips for a job interview.",
                "Write a short poem about the sea.", "What should I pack for a weekend trip?"],
    "smollm2-math": ["A train travels 60 miles per hour for 3 hours. How far does it go?",
                     "If 3 apples cost 1.50 dollars, how much do 7 apples cost?",
                     "Tom has 12 marbles and gives away a third of them. How many are left?",
                     "What is 15 percent of 80?"],
    "smollm2-code": ["Write a python function to find the maximum of three numbers.",
                     "Write a function to reverse the words in a string.",
                     "Write a python function to check whether a number is prime.",
                     "Write a python function that counts vowels in a string."],
}


def machine() -> dict:
    """The machine facts of :func:`bench.record.machine_info` plus ``date`` (now) and ``note``.

    Prefer :class:`bench.record.RunRecord`, which also reads the load before *and* after a run.
    """
    from bench.record import machine_info

    return {
        **machine_info(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "load_avg_now": [round(x, 2) for x in os.getloadavg()],
        "note": "shared 2-core CPU development machine",
    }


def thread_env(threads: int, device: str = "cpu") -> dict[str, str]:
    """Environment that gives the hf and the vLLM engine the same ``threads`` compute threads.

    ``OMP_NUM_THREADS`` for torch (the hf engine also gets ``cpu_threads``); on the CPU, vLLM's
    worker binds its OpenMP threads to cores 0..threads-1 (left on ``auto`` it binds one core
    fewer than the machine has). Set it before torch or vLLM is imported; Ray workers inherit it.
    """
    env = {"OMP_NUM_THREADS": str(threads)}
    if device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    return env


def expert_loras(work: Path) -> dict[str, Path]:
    """LoRA folders for smollm2-math and smollm2-code: the trained ones when present under
    adapters/experts, else random rank-8 LoRAs made with peft (same shapes and cost)."""
    out = {}
    for name in ("math", "code"):
        trained = REPO / "adapters" / "experts" / name
        if (trained / "adapter_config.json").is_file():
            out[f"smollm2-{name}"] = trained
            continue
        folder = work / name
        if not (folder / "adapter_config.json").is_file():
            _random_lora(folder, seed=len(out) + 1)
        out[f"smollm2-{name}"] = folder
    return out


def _random_lora(out: Path, seed: int, rank: int = 8) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from coe.model_paths import resolve

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct"))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)


def write_results(name: str, data: dict, summary_md: str) -> None:
    """``bench/results/<name>.{json,md}`` through :func:`bench.record.write_results`; prints the summary."""
    from bench.record import write_results as write

    write(name, data, summary_md)
    print(summary_md)


def percentile(values: list[float], q: float) -> float:
    """See :func:`bench.stats.percentile`."""
    from bench.stats import percentile as pct

    return pct(values, q)
