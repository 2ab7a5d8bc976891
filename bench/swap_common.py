"""Shared parts of the swap benchmarks: random experts of a given shape (and a tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from bench.record import write_results  # noqa: F401  (re-exported for the swap benchmarks)
from bench.shapes import PRESETS, Shape, init_device, llama_config  # noqa: F401
from bench.stats import percentile  # noqa: F401

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def quiet() -> None:
    """No progress bars or hub lookups while timing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def tokenizer_source() -> Path | None:
    """SmolLM2's folder when prepared (a real 49k-token tokenizer with a chat template)."""
    try:
        from coe.model_paths import is_prepared
        from coe.paths import models_dir
    except ImportError:  # pragma: no cover - the bench also runs where coe's deps are absent
        return None
    if is_prepared("smollm2-135m-instruct"):
        return models_dir() / "smollm2-135m-instruct"
    return None


def make_experts(root: Path, n: int, shape: Shape, dtype: str) -> dict[str, str]:
    """Save ``n`` randomly initialised llamas of ``shape`` (seeds 0..n-1) under ``root``.

    The tokenizer is SmolLM2's when prepared, otherwise a small word-level one built here.
    Weights are initialised on CUDA when present (fast), saved as safetensors in ``dtype``.
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    src = tokenizer_source()
    tok_dir = root / "_tokenizer"
    if src is not None:
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, tok_dir / name)
    else:
        _word_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = llama_config(shape, max(shape.vocab or 0, len(tok)), bos=tok.bos_token_id, eos=tok.eos_token_id,
                       pad=tok.pad_token_id, dtype=dtype)
    out = {}
    for i in range(n):
        folder = root / f"expert{i:02d}"
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(i)
            with torch.device(init_device()):
                model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
            model.save_pretrained(folder, safe_serialization=True)
            del model
            for name in TOKENIZER_FILES:
                if (tok_dir / name).exists():
                    shutil.copy(tok_dir / name, folder / name)
        out[f"expert{i:02d}"] = str(folder)
    return out


def _word_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in ["the", "a", "of", "to", "and", "is", "in", "what", "how", "why", "capital", "city", "math", "code",
              "python", "question", "answer"]:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(folder)
