"""Flat weight layouts: every tensor of a model as a view into one contiguous byte buffer.

A swap then is one ``copy_`` of one buffer (host → device), which runs at the copy bandwidth
of the link, instead of hundreds of small per-tensor copies. The layout is computed once per
architecture shape; every expert of that shape packs its weights into a host buffer with the
same layout, and every device slot binds a module skeleton's parameters to views of its own
buffer of the same layout.

Tied tensors (``lm_head.weight is embed_tokens.weight``) appear once in the layout and are
bound to every name that shares them. Non-persistent buffers (rotary ``inv_freq``) are part of
the layout too, so a skeleton built on the ``meta`` device needs nothing recomputed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALIGN = 64  # bytes; every view starts on a 64-byte boundary (cache lines, vector loads)

# Config fields that name or version a checkpoint without changing the module it builds.
_IDENTITY_FIELDS = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path")


@dataclass(frozen=True)
class TensorSpec:
    """One unique tensor: every module path that shares it, its shape, dtype and byte range."""

    names: tuple[str, ...]
    kind: str  # "param" | "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a model of one architecture shape lives in a flat byte buffer."""

    key: str
    specs: tuple[TensorSpec, ...]
    nbytes: int

    def empty(self, device, pin: bool = False) -> torch.Tensor:
        """An uninitialised flat uint8 buffer of this layout (pinned host memory if ``pin``)."""
        import torch

        return torch.empty(self.nbytes, dtype=torch.uint8, device=device, pin_memory=pin)

    def view(self, flat: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
        """The tensor ``spec`` as a view into ``flat`` (no copy)."""
        return flat[spec.offset : spec.offset + spec.nbytes].view(spec.dtype).view(spec.shape)

    def pack(self, model, flat: torch.Tensor) -> None:
        """Copy ``model``'s tensors into ``flat``. Raises ValueError if ``model`` has another shape."""
        got = shape_key(model)
        if got != self.key:
            raise ValueError("model does not match this layout (different architecture shape)")
        tensors = _unique_tensors(model)
        for spec in self.specs:
            self.view(flat, spec).copy_(tensors[spec.names[0]][1])

    def bind(self, skeleton, flat: torch.Tensor) -> None:
        """Point every parameter and buffer of ``skeleton`` at its view of ``flat``.

        ``skeleton`` may live on the ``meta`` device (nothing is allocated); afterwards its
        tensors are exactly the views, so copying into ``flat`` changes the model's weights.
        """
        import torch

        for spec in self.specs:
            tensor = self.view(flat, spec)
            if spec.kind == "param":
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            for name in spec.names:
                owner, _, leaf = name.rpartition(".")
                module = skeleton.get_submodule(owner) if owner else skeleton
                if spec.kind == "param":
                    module._parameters[leaf] = tensor
                else:
                    module._buffers[leaf] = tensor


def _unique_tensors(model) -> dict[str, tuple[str, torch.Tensor]]:
    """First name of each unique tensor → (kind, tensor); also maps every alias name."""
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = ("param", p)
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            out[name] = ("buffer", b)
    return out


def shape_key(model) -> str:
    """A string equal for two models iff one's skeleton can hold the other's weights.

    The class plus its config (minus name/version fields): same structure, same tensor shapes
    and dtypes, and the same hyperparameters the forward pass reads (eps, activation, rope).
    """
    cfg = model.config.to_dict()
    for field in _IDENTITY_FIELDS:
        cfg.pop(field, None)
    tensors = [(n, k, tuple(t.shape), str(t.dtype)) for n, (k, t) in sorted(_unique_tensors(model).items())]
    return json.dumps([type(model).__name__, cfg, tensors], sort_keys=True, default=str)


def layout_of(model) -> Layout:
    """The flat layout of ``model`` (any device, ``meta`` included)."""
    groups: dict[int, list[str]] = {}
    first: dict[int, tuple[str, torch.Tensor]] = {}
    for name, (kind, t) in _unique_tensors(model).items():
        groups.setdefault(id(t), []).append(name)
        first.setdefault(id(t), (kind, t))
    specs, offset = [], 0
    for ident, names in groups.items():
        kind, t = first[ident]
        nbytes = t.numel() * t.element_size()
        specs.append(TensorSpec(tuple(names), kind, tuple(t.shape), t.dtype, offset, nbytes))
        offset += -(-nbytes // ALIGN) * ALIGN
    return Layout(key=shape_key(model), specs=tuple(specs), nbytes=max(offset, ALIGN))
