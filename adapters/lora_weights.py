"""Read a standard PEFT LoRA folder into plain per-module (A, B·scale) tensors.

Supports what ``peft.LoraConfig`` saves for linear layers: any rank, ``lora_alpha``,
``use_rslora`` (scale ``alpha/sqrt(r)`` instead of ``alpha/r``), ``rank_pattern`` /
``alpha_pattern`` overrides, ``layers_to_transform`` and any set of target modules.
Refuses, with an :class:`~coe.errors.AdapterError` naming the reason, what the fast path does
not compute: DoRA, LoRA on embeddings or convolutions, ``fan_in_fan_out`` (Conv1D models),
LoRA biases, non-LoRA PEFT methods.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from coe.errors import AdapterError

_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "lora_bias": "LoRA biases",
}


@dataclass
class LoraWeights:
    """One adapter: ``modules[name] = (A [r, in], B [out, r] already multiplied by its scale)``.

    Module names are the base model's (``model.layers.0.self_attn.q_proj``), not peft's."""

    name: str
    path: str
    modules: dict = field(default_factory=dict)  # name -> (A, B)
    config: dict = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)


def _pattern_value(pattern: dict, module: str, default):
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module name suffix or regex."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def load_lora(path: str | Path, name: str | None = None, dtype=None) -> LoraWeights:
    """Load a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``).

    Raises AdapterError when the folder is missing, unreadable or uses an unsupported feature."""
    import torch

    folder = Path(path)
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter folder: adapter_config.json is missing")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"cannot read {cfg_file}: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not LORA (only LoRA adapters load here)")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(flag):
            raise AdapterError(f"{folder}: {what} is not supported by the multi-LoRA path")
    state = _load_state(folder)
    # The rank is read from the tensors (rank_pattern only told peft what to build).
    alpha_default = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            if "lora_embedding" in key or "magnitude" in key:
                raise AdapterError(f"{folder}: tensor {key!r} (embedding LoRA or DoRA) is not supported")
            if key.endswith(".bias"):
                raise AdapterError(f"{folder}: tensor {key!r}: LoRA biases are not supported")
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = tensor
    if not pairs:
        raise AdapterError(f"{folder}: no lora_A/lora_B weights found")
    out = LoraWeights(name=name or folder.name, path=str(folder), config=cfg)
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{folder}: module {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(f"{folder}: module {module} is not a linear LoRA (A {tuple(a.shape)})")
        r = a.shape[0]
        if b.shape[1] != r:
            raise AdapterError(f"{folder}: module {module}: A has rank {r} but B {tuple(b.shape)}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_default))
        scale = alpha / (r**0.5) if rslora else alpha / r
        a = a.to(dtype or a.dtype)
        out.modules[module] = (a, (b.to(torch.float32) * scale).to(dtype or b.dtype))
    return out


def _load_state(folder: Path) -> dict:
    import torch

    st, binf = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if binf.is_file():
            return torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file: name it
        raise AdapterError(f"cannot read the adapter weights in {folder}: {exc}") from exc
    raise AdapterError(f"{folder}: neither adapter_model.safetensors nor adapter_model.bin exists")
