"""Validation of a PEFT LoRA adapter folder, shared by both engines.

Checked before any library touches the folder, so a bad adapter fails at registration with a
message naming the file, not with a library traceback at the first request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from coe.errors import AdapterError

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LoraInfo:
    path: str
    rank: int
    target_modules: list[str]
    base_model: str | None


def validate_lora_adapter(path: str | Path, max_rank: int) -> LoraInfo:
    """Check that ``path`` is a readable PEFT LoRA adapter of rank <= ``max_rank``.

    Raises AdapterError naming the folder or file and what is wrong.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise AdapterError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise AdapterError(f"adapter path {folder} is a file; an adapter is a folder with adapter_config.json")
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{cfg_file} is missing: not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise AdapterError(f"{cfg_file} is not readable JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_file} must hold a JSON object")
    peft_type = cfg.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type is {peft_type!r}; only LORA adapters are supported")
    ranks = [cfg.get("r")] + list((cfg.get("rank_pattern") or {}).values())
    if not all(isinstance(r, int) and r >= 1 for r in ranks):
        raise AdapterError(f"{cfg_file}: rank 'r' must be a positive integer, got {cfg.get('r')!r}")
    rank = max(ranks)
    if rank > max_rank:
        raise AdapterError(
            f"{cfg_file}: LoRA rank {rank} exceeds the engine's max_lora_rank {max_rank}; "
            "raise engine.max_lora_rank or use a smaller adapter"
        )
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise AdapterError(f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)})")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    return LoraInfo(str(folder.resolve()), rank, list(targets), cfg.get("base_model_name_or_path"))
