"""Shared parts of the swap benchmarks: random experts of a given shape, machine facts, results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Shape:
    """A llama shape; the default is small enough for 16 copies on a 2-core CPU machine."""

    hidden: int = 384
    layers: int = 6
    intermediate: int = 1024
    heads: int = 6
    kv_heads: int = 2
    tie: bool = True
    vocab: int | None = None  # None: the tokenizer's size


    def label(self) -> str:
        return f"llama h{self.hidden} L{self.layers} ffn{self.intermediate} heads{self.heads}/{self.kv_heads}"


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
        from coe.models import is_prepared, models_dir
    except ImportError:  # pragma: no cover - the bench also runs where coe's deps are absent
        return None
    if is_prepared("smollm2-135m-instruct"):
        return models_dir() / "smollm2-135m-instruct"
    return None


PRESETS = {
    "small": Shape(),
    "smollm2": Shape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152),
    "qwen0.5b": Shape(hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2, vocab=151936),
}


def make_experts(root: Path, n: int, shape: Shape, dtype: str) -> dict[str, str]:
    """Save ``n`` randomly initialised llamas of ``shape`` (seeds 0..n-1) under ``root``.

    The tokenizer is SmolLM2's when prepared, otherwise a 512-token byte-level one built here.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    src = tokenizer_source()
    tok_dir = root / "_tokenizer"
    if src is not None:
        tok_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy(src / name, tok_dir / name)
    else:
        _byte_tokenizer(tok_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(
        vocab_size=max(shape.vocab or 0, len(tok)),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=shape.tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype=dtype,
    )
    out = {}
    for i in range(n):
        folder = root / f"expert{i:02d}"
        if not (folder / "model.safetensors").exists():
            folder.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(i)
            model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
            model.save_pretrained(folder, safe_serialization=True)
            for name in TOKENIZER_FILES:
                if (tok_dir / name).exists():
                    shutil.copy(tok_dir / name, folder / name)
        out[f"expert{i:02d}"] = str(folder)
    return out


def _byte_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in ["the", "a", "of", "to", "and", "is", "in", "what", "how", "why", "capital", "city", "math", "code", "python", "question", "answer"]:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(folder)


def machine() -> dict:
    """What the figures were measured on (device, CPU, load, versions, date)."""
    import torch

    info = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def write_results(name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``bench/results/<name>.json`` and ``.md``; returns both paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    js.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    md.write_text(markdown.rstrip() + "\n")
    return js, md


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
