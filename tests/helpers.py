"""Helpers shared by the test packages: one event loop on a thread, tiny LoRA adapters."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path


class LoopThread:
    """An asyncio loop running forever on a daemon thread; ``run`` waits for a coroutine.

    vLLM's ``AsyncLLM`` binds to the loop that first uses it, so every engine call in these
    tests goes through one long-lived loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-tests-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_lora(base_dir: Path, out: Path, *, rank: int = 4, seed: int = 0, targets=("q_proj", "v_proj")) -> Path:
    """Save a peft LoRA adapter for the model in ``base_dir`` with non-zero random B weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out
