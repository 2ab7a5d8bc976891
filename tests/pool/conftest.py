"""Pool fixtures: several tiny random llamas (same shape, different seeds) and one of another shape."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_tiny_expert(tokenizer_dir: Path, out: Path, *, seed: int, intermediate: int = 128) -> Path:
    """A tiny llama like ``tiny_llama_dir`` (its tokenizer) with weights from ``seed``."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    cfg = AutoConfig.from_pretrained(tokenizer_dir)
    cfg.intermediate_size = intermediate
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_experts(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Four tiny llamas of one shape: expert id -> folder."""
    root = tmp_path_factory.mktemp("pool-experts")
    return {f"e{i}": make_tiny_expert(tiny_llama_dir, root / f"e{i}", seed=10 + i) for i in range(4)}


@pytest.fixture(scope="session")
def odd_expert(tiny_llama_dir, tmp_path_factory) -> Path:
    """A tiny llama of another shape (wider MLP)."""
    return make_tiny_expert(tiny_llama_dir, tmp_path_factory.mktemp("pool-odd") / "odd", seed=99, intermediate=192)
