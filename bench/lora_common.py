"""Shared parts of the LoRA benchmarks: a random llama of a chosen shape, random PEFT adapters,
the device/dtype/shape arguments they all take."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.shapes import PRESETS, Shape, init_device, llama_config


def add_model_args(p: argparse.ArgumentParser, *, preset: str = "lora-cpu") -> None:
    """``--preset`` (bench.shapes) with ``--hidden/--layers/--vocab`` overrides, ``--device``, ``--dtype``."""
    p.add_argument("--preset", default=preset, choices=sorted(PRESETS))
    p.add_argument("--hidden", type=int, default=None, help="override the preset's hidden size")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--vocab", type=int, default=None, help="override the preset's vocabulary")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def shape_of(args) -> Shape:
    """The preset's shape with the command line's overrides (the FFN scales with ``--hidden``)."""
    s = PRESETS[args.preset]
    hidden = args.hidden or s.hidden
    inter = s.intermediate if args.hidden is None else hidden * 8 // 3
    heads = s.heads if args.hidden is None else max(1, hidden // 64)
    kv = s.kv_heads if args.hidden is None else max(1, heads // 2)
    return Shape(hidden=hidden, layers=args.layers or s.layers, intermediate=inter, heads=heads, kv_heads=kv,
                 tie=s.tie, vocab=args.vocab or s.vocab or 8192)


def random_llama(folder: Path, shape: Shape):
    """Save a random llama of ``shape`` (float32) to ``folder``; returns nothing (load it with :func:`load`)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(init_device()):
        model = LlamaForCausalLM(llama_config(shape, shape.vocab or 8192))
    model.save_pretrained(folder)
    del model


def load(folder: Path, device: str = "cpu", dtype: str = "float32"):
    """The model in ``folder`` on ``device`` in ``dtype``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()


def random_loras(base_folder: Path, root: Path, n: int, *, rank: int, targets: list[str]) -> list[Path]:
    """``n`` PEFT LoRA folders with random (non-zero) A and B (seeds 100..100+n-1)."""
    import torch
    from peft import LoraConfig, get_peft_model

    base = load(base_folder, init_device())
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        pm.save_pretrained(root / f"lora{i}")
        base = pm.unload()  # the plain base model again, for the next adapter
        out.append(root / f"lora{i}")
    return out


def sync_of(device: str):
    """``torch.cuda.synchronize`` on CUDA (so a timer measures finished work), else None."""
    import torch

    return torch.cuda.synchronize if device == "cuda" else None
