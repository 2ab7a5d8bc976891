"""Loading a model for an in-process engine: device, dtype, context window, load errors."""

from __future__ import annotations

import json
from pathlib import Path

from coe.config import EngineConfig
from coe.errors import ModelNotFoundError


def model_load_error(model_ref: str, err: Exception) -> ModelNotFoundError:
    """The error for a model (or tokenizer) that failed to load: a folder that exists but is
    unreadable, or a reference that is neither a folder nor a reachable hub id."""
    from coe.model_paths import hub_error

    if Path(model_ref).exists():
        return ModelNotFoundError(f"model folder {model_ref} cannot be loaded: {type(err).__name__}: {str(err)[:300]}")
    return hub_error(model_ref, err)


def model_max_len(model_dir: str, configured: int) -> int:
    """The context window: ``configured``, capped by the model's own position limit when known."""
    cfg_file = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return configured
    cfg = cfg.get("text_config", cfg)
    limit = cfg.get("max_position_embeddings")
    return min(configured, int(limit)) if isinstance(limit, int) and limit > 0 else configured


def resolve_device(config: EngineConfig) -> str:
    """'cpu' or 'cuda' ('auto' picks CUDA when torch sees one)."""
    if config.device != "auto":
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(config: EngineConfig, device: str, *, engine: str):
    """The torch dtype name: 'auto' is bfloat16 on CUDA, float32 for hf on CPU, bfloat16 for vLLM."""
    if config.dtype != "auto":
        return config.dtype
    if device == "cuda" or engine == "vllm":
        return "bfloat16"
    return "float32"
