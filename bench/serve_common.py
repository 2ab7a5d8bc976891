"""Shared parts of the serving benchmarks: three experts on SmolLM2, a mixed workload, results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
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
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "note": "shared 2-core CPU development machine; other work ran at the same time",
    }


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

    from coe.models import resolve

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct"))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(out)


def write_results(name: str, data: dict, summary_md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    (RESULTS / f"{name}.md").write_text(summary_md)
    print(summary_md)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")
