"""Shared parts of the LoRA benchmarks: a random llama of a chosen shape, random PEFT adapters,
timing, and result files (``bench/results/<name>.json`` + ``.md``)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "load_avg_at_start": os.getloadavg()[0],
        "note": "shared 2-core CPU machine; teammates' jobs ran at the same time, so absolute figures "
        "are noisy: compare the ratios measured side by side in one run",
    }


def random_llama(folder: Path, *, hidden: int, layers: int, inter: int, vocab: int, heads: int = 8, kv: int = 4):
    """Save a random llama of this shape to ``folder`` and return it loaded (float32, eval)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return model


def load(folder: Path, **kw):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    return m


def random_loras(base_folder: Path, root: Path, n: int, *, rank: int, targets: list[str]) -> list[Path]:
    """``n`` PEFT LoRA folders with random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model

    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(load(base_folder), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        pm.save_pretrained(root / f"lora{i}")
        out.append(root / f"lora{i}")
    return out


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def write(name: str, data: dict, md: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
