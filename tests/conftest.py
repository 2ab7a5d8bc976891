"""Shared fixtures: tiny random models built from a config, tiny peft LoRA adapters, real models.

Tiny fixtures need no downloads and load in milliseconds. Fixtures for the real built-in
models skip (with the command to run) when ``coe models prepare`` has not been run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_lora

# Never reach for a model hub from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if item.get_closest_marker("gpu") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def _tiny_tokenizer(folder: Path):
    """A real tokenizer (SmolLM2's, when prepared) or a tiny word-level one built in place."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    words = ["the", "a", "of", "to", "and", "is", "in", "what", "capital", "france", "paris", "city", "math", "code", "python", "def", "return", "x", "y", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "+", "-", "*", "=", "?", ".", ",", ":", "!", "user", "assistant", "system", "hello", "world", "question", "answer"]
    for w in words:
        vocab.setdefault(w, len(vocab))
    for tok in ["<|user|>", "<|assistant|>", "<|system|>", "\n"]:
        vocab.setdefault(tok, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer, width-64 random llama with a word-level tokenizer, saved as a model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = _tiny_tokenizer(folder)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return folder




@pytest.fixture(scope="session")
def tiny_loras(tiny_llama_dir, tmp_path_factory) -> list[Path]:
    """Three tiny LoRA adapters on the tiny llama (ranks 4, 8 and 2; different targets)."""
    root = tmp_path_factory.mktemp("tiny-loras")
    return [
        make_lora(tiny_llama_dir, root / "a", rank=4, seed=1),
        make_lora(tiny_llama_dir, root / "b", rank=8, seed=2, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
        make_lora(tiny_llama_dir, root / "c", rank=2, seed=3, targets=("gate_proj", "up_proj", "down_proj")),
    ]


def _prepared(alias: str) -> Path:
    from coe.model_paths import is_prepared
    from coe.paths import models_dir

    if not is_prepared(alias):
        pytest.skip(f"built-in model {alias} is not prepared: run `coe models prepare {alias}`")
    return models_dir() / alias


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return _prepared("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    return _prepared("gemma3-270m")


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return _prepared("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return _prepared("minilm-l6")


@pytest.fixture(scope="module")
def shipped(minilm_dir):
    """The default config and the router it ships (its embedder prepared, else skip)."""
    from coe.config import load_config
    from coe.model_paths import is_prepared
    from coe.routers import build_online_router

    cfg = load_config()
    if not is_prepared(cfg.router.embedder):
        pytest.skip(f"embedder {cfg.router.embedder} is not prepared: run `coe models prepare`")
    return cfg, build_online_router(cfg.router, cfg.experts)
