"""Host copies of whole-model experts: one flat (pinned, on CUDA) buffer of weights per expert.

Loading an expert reads it once with ``from_pretrained`` on the CPU, packs every tensor into a
flat buffer with its architecture shape's :class:`~coe.serving.pool.layout.Layout`, and drops the
module. Experts of the same shape share the layout and the module skeleton recipe (the config),
so a device slot built for one can hold any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from coe.errors import ModelNotFoundError

if TYPE_CHECKING:
    import torch

    from coe.serving.pool.layout import Layout


@dataclass
class HostExpert:
    """One expert held in host memory.

    ``flat`` is the packed weights (pinned host memory when ``pinned``); ``config`` builds the
    module skeleton; ``tokenizer`` and ``eos_ids`` drive its generation.
    """

    id: str
    path: str
    layout: Layout
    flat: torch.Tensor
    config: object  # transformers PretrainedConfig
    tokenizer: object
    eos_ids: list[int] = field(default_factory=list)
    pinned: bool = False

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes


def eos_ids_of(model, tokenizer) -> list[int]:
    """Every token id that ends an answer: the generation config's eos ids plus the tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for source in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                   getattr(tokenizer, "eos_token_id", None)):
        if source is None:
            continue
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def build_skeleton(config, dtype: torch.dtype):
    """A module of ``config``'s architecture on the ``meta`` device (no memory, no init cost)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_host_expert(
    expert_id: str,
    path: str | Path,
    *,
    dtype: torch.dtype,
    pin: bool,
    layouts: dict[str, Layout],
) -> HostExpert:
    """Read ``path`` once and pack it into a flat host buffer.

    ``layouts`` (shape key → layout) is shared between calls so experts of one shape share one
    layout object. Raises ModelNotFoundError when the folder cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from coe.serving.engines.tokens import load_tokenizer
    from coe.serving.pool.layout import layout_of, shape_key

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"expert {expert_id!r}: model {path} cannot be loaded: {type(err).__name__}: {str(err)[:300]}"
        ) from None
    tokenizer = load_tokenizer(str(path))
    key = shape_key(model)
    layout = layouts.get(key)
    if layout is None:
        layout = layouts[key] = layout_of(model)
    flat = layout.empty("cpu", pin=pin)
    with torch.no_grad():
        layout.pack(model, flat)
    return HostExpert(
        id=expert_id,
        path=str(path),
        layout=layout,
        flat=flat,
        config=model.config,
        tokenizer=tokenizer,
        eos_ids=eos_ids_of(model, tokenizer),
        pinned=pin,
    )
