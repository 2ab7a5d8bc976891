"""Mixed multi-LoRA batches: every row of a batch uses its own adapter, or a weighted mix.

How it computes (one dense kernel for plain LoRA, mixed batches and mixtures alike): for each
adapted linear layer the adapters' ``A`` matrices are concatenated along the rank,
``A_cat [R, in]`` with ``R = Σ r_i``, and their (pre-scaled) ``B`` matrices along the rank too,
``B_cat [out, R]``. A row ``b`` with per-adapter weights ``w[b, i]`` gets

    y = base(x) + ((x @ A_catᵀ) ⊙ (w @ E)) @ B_catᵀ        # E [n, R]: adapter i owns its r_i columns

so a plain LoRA row has a one-hot ``w``, a row without adapter an all-zero ``w``, and a
mixture (MoLE, X-LoRA) real-valued weights, possibly per token and per layer. Every adapter's
weights are read once per step whatever the batch size, in two GEMMs — no loop over adapters,
no per-row gather of weight matrices (BGMV's memory traffic grows with the batch; this does
not). Columns of adapters that no row uses are dropped for the step. Ranks need no padding.
When a batch of one-hot rows uses many distinct adapters, the dense kernel's compute (which
grows with their total rank) loses to a gathered BGMV path (per-row ``A``/``B`` gathered once
per ``generate`` call, two ``bmm`` per layer): see :class:`BatchWeights` for the choice.

Usage::

    ml = MultiLoRA(model)                   # any transformers causal LM (not peft-wrapped)
    ml.add("math", "adapters/experts/math") # a PEFT LoRA folder
    with ml.batch(["math", None, "code"]):  # one entry per row; works with model.generate
        out = model.generate(ids, ...)

Not thread-safe: one batch context at a time per model.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from coe.adapters.lora_weights import LoraWeights, load_lora
from coe.errors import AdapterError

_LAYER = re.compile(r"\.layers\.(\d+)\.")


class BatchWeights:
    """The current step's adapter weights, shared by all wrapped layers of one model.

    ``rows`` is ``[B, n]`` (the same for every layer and token) or a callable
    ``MultiLoRALinear -> [B, n] | [B, T, n] | None`` (mixtures whose weights depend on the
    layer and token; it may read ``.layer``, the decoder layer index). For static rows each
    layer's operands are computed once per context (once per ``generate`` call), not per token.

    Two ways to compute a static batch, picked per layer by ``mode``:

    * ``dense``: the concatenated-rank kernel (module docstring). Weights read once per step;
      compute grows with the total rank of the adapters the batch uses.
    * ``gather`` (BGMV): one-hot rows only; each row's ``A``/``B`` gathered (once per context)
      into ``[B, r_max, in]`` / ``[B, out, r_max]`` (ranks zero-padded, no adapter = zeros) and
      applied with two ``bmm``; compute grows with the batch, not with the number of adapters.
    * ``auto``: gather when the rows are one-hot and the batch uses more than
      ``GATHER_MIN_ADAPTERS`` distinct adapters on the layer, else dense.
    """

    GATHER_MIN_ADAPTERS = 8

    def __init__(self, rows, n_adapters: int, mode: str = "auto") -> None:
        self.rows = rows
        self.n = n_adapters
        self.mode = mode
        self._static: dict[int, tuple | None] = {}
        if not callable(rows):
            nz = rows != 0
            self.one_hot = bool(((nz.sum(-1) <= 1) & ((rows == 0) | (rows == 1)).all(-1)).all())
            self.index = torch.where(nz.any(-1), rows.argmax(-1), torch.full_like(rows[:, 0], -1, dtype=torch.long))

    def operands(self, layer: MultiLoRALinear):
        """``("dense", A [R', in], B [out, R'], mask [B, 1|T, R'])`` or ``("gather", A [B, r, in],
        B [B, out, r])`` for this step, or None to skip the layer."""
        if callable(self.rows):
            w = self.rows(layer)
            if w is None:
                return None
            m = w.to(layer.expand.dtype) @ layer.expand  # [B, (T,) n] @ [n, R]
            return "dense", layer.A, layer.B, (m.unsqueeze(1) if m.dim() == 2 else m)
        key = id(layer)
        if key not in self._static:
            self._static[key] = self._prepare(layer)
        return self._static[key]

    def _prepare(self, layer: MultiLoRALinear):
        w = self.rows.to(layer.expand.dtype)  # [B, n]
        targets = layer.expand.sum(-1) > 0  # [n]: adapters with weights on this layer
        active = (w != 0).any(0) & targets  # [n]
        n_active = int(active.sum())
        if n_active == 0:
            return None
        gather = self.mode == "gather" or (self.mode == "auto" and n_active > self.GATHER_MIN_ADAPTERS)
        if gather and self.one_hot:
            a_stack, b_stack = layer.stacks()  # [n+1, r, in], [n+1, out, r]; slot n is zeros
            idx = torch.where(self.index >= 0, self.index, torch.full_like(self.index, self.n))
            return "gather", a_stack[idx], b_stack[idx]  # [B, r, in], [B, out, r]
        used = (w != 0).any(0).to(w.dtype) @ layer.expand > 0  # [R]: columns some row needs
        if bool(used.all()):
            return "dense", layer.A, layer.B, (w @ layer.expand).unsqueeze(1)
        cols = used.nonzero().squeeze(1)  # drop the columns of adapters no row uses
        return "dense", layer.A[cols], layer.B[:, cols], (w @ layer.expand[:, cols]).unsqueeze(1)


class MultiLoRALinear(nn.Module):
    """A linear layer plus the concatenated LoRA matrices of every loaded adapter that targets it."""

    def __init__(self, base: nn.Linear, layer: int) -> None:
        super().__init__()
        self.base = base
        self.layer = layer
        self.owner: MultiLoRA | None = None
        self.slots: dict[str, tuple[int, int]] = {}  # adapter -> column range in A/B
        self.register_buffer("A", base.weight.new_zeros(0, base.in_features), persistent=False)
        self.register_buffer("B", base.weight.new_zeros(base.out_features, 0), persistent=False)
        self.expand: torch.Tensor | None = None  # [n_adapters, R] 0/1
        self._stacks: tuple[torch.Tensor, torch.Tensor] | None = None
        self._order: list[str] = []

    @property
    def weight(self):  # code that inspects .weight (dtype, device) keeps working
        return self.base.weight

    def rebuild(self, parts: list[tuple[str, torch.Tensor, torch.Tensor]], order: list[str]) -> None:
        """Lay out ``parts`` (adapter, A [r, in], B [out, r]) and the adapter→column map for ``order``."""
        w = self.base.weight
        self.slots, start = {}, 0
        for name, a, _ in parts:
            self.slots[name] = (start, start + a.shape[0])
            start += a.shape[0]
        self.A = torch.cat([a for _, a, _ in parts]).to(w) if parts else w.new_zeros(0, w.shape[1])
        self.B = torch.cat([b for _, _, b in parts], dim=1).to(w) if parts else w.new_zeros(w.shape[0], 0)
        self.expand = w.new_zeros(len(order), start)
        self._stacks, self._order = None, list(order)
        for i, name in enumerate(order):
            if name in self.slots:
                lo, hi = self.slots[name]
                self.expand[i, lo:hi] = 1.0

    def stacks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [n+1, r_max, in]``, ``B [n+1, out, r_max]`` in adapter order, ranks zero-padded;
        adapters that do not target this layer and the last slot (no adapter) are zeros."""
        if self._stacks is None:
            w = self.base.weight
            r_max = max((hi - lo for lo, hi in self.slots.values()), default=0)
            a = w.new_zeros(len(self._order) + 1, r_max, w.shape[1])
            b = w.new_zeros(len(self._order) + 1, w.shape[0], r_max)
            for i, name in enumerate(self._order):
                if name in self.slots:
                    lo, hi = self.slots[name]
                    a[i, : hi - lo] = self.A[lo:hi]
                    b[i, :, : hi - lo] = self.B[:, lo:hi]
            self._stacks = (a, b)
        return self._stacks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self.owner.current if self.owner is not None else None
        if ctx is None or not self.slots:
            return y
        ops = ctx.operands(self)
        if ops is None:
            return y
        if ops[0] == "gather":
            A, B = ops[1], ops[2]  # [B, r, in], [B, out, r]
            if A.shape[0] != x.shape[0]:  # generate() expanded rows (num_return_sequences, beams)
                A, B = (t.repeat_interleave(x.shape[0] // t.shape[0], dim=0) for t in (A, B))
            h = torch.bmm(x, A.transpose(1, 2))  # [B, T, r]
            return y + torch.bmm(h, B.transpose(1, 2))  # [B, T, out]
        A, B, mask = ops[1:]  # [R, in], [out, R], [B, 1|T, R]
        if mask.shape[0] != x.shape[0]:
            mask = mask.repeat_interleave(x.shape[0] // mask.shape[0], dim=0)
        h = nn.functional.linear(x, A) * mask  # [B, T, R]
        return y + nn.functional.linear(h, B)  # [B, T, out]


class MultiLoRA:
    """Serve many PEFT LoRA adapters on one transformers model, mixed freely within a batch.

    The model's targeted ``nn.Linear`` layers are wrapped in place (outputs are unchanged while
    no batch context is active). ``add``/``remove`` may be called between batches."""

    def __init__(self, model: nn.Module, mode: str = "auto") -> None:
        if mode not in ("auto", "dense", "gather"):
            raise AdapterError(f"multi-LoRA mode {mode!r} is unknown; allowed: auto, dense, gather")
        self.mode = mode
        if hasattr(model, "peft_config"):
            raise AdapterError("MultiLoRA wraps a plain transformers model, not a peft-wrapped one")
        self.model = model
        self.adapters: dict[str, LoraWeights] = {}
        self.layers: dict[str, MultiLoRALinear] = {}
        self.current: BatchWeights | None = None

    # -- adapters -------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def add(self, name: str, path_or_weights: str | Path | LoraWeights) -> None:
        """Load a PEFT LoRA folder under ``name`` (AdapterError: bad folder, unknown module, duplicate)."""
        if name in self.adapters:
            raise AdapterError(f"adapter {name!r} is already loaded; remove it first")
        w = path_or_weights if isinstance(path_or_weights, LoraWeights) else load_lora(path_or_weights, name)
        modules = dict(self.model.named_modules())
        for mod in w.modules:
            target = modules.get(mod)
            if isinstance(target, MultiLoRALinear):
                target = target.base
            if not isinstance(target, nn.Linear):
                raise AdapterError(
                    f"adapter {name!r} targets {mod!r}, which is not a linear layer of this model"
                )
            a, b = w.modules[mod]
            if a.shape[1] != target.in_features or b.shape[0] != target.out_features:
                raise AdapterError(
                    f"adapter {name!r}: {mod} expects {target.in_features}->{target.out_features}, "
                    f"the adapter has {a.shape[1]}->{b.shape[0]} (made for another base model?)"
                )
        for mod in w.modules:
            if mod not in self.layers:
                self._wrap(mod)
        self.adapters[name] = w
        self._rebuild()

    def remove(self, name: str) -> None:
        """Forget an adapter (unknown names are ignored)."""
        if self.adapters.pop(name, None) is not None:
            self._rebuild()

    def _wrap(self, mod: str) -> None:
        parent_name, _, child = mod.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        m = _LAYER.search("." + mod + ".")
        wrapped = MultiLoRALinear(getattr(parent, child), int(m.group(1)) if m else -1)
        wrapped.owner = self
        setattr(parent, child, wrapped)
        self.layers[mod] = wrapped

    def _rebuild(self) -> None:
        order = self.names
        for mod, layer in self.layers.items():
            parts = [(n, *w.modules[mod]) for n, w in self.adapters.items() if mod in w.modules]
            layer.rebuild(parts, order)

    # -- batches --------------------------------------------------------------------------
    def row_weights(self, rows: Sequence[str | None]) -> torch.Tensor:
        """One-hot ``[B, n]`` weights for a list of adapter names (None: the base model)."""
        w = torch.zeros(len(rows), len(self.adapters))
        index = {n: i for i, n in enumerate(self.adapters)}
        for r, name in enumerate(rows):
            if name is None:
                continue
            if name not in index:
                raise AdapterError(f"unknown adapter {name!r}; loaded: {sorted(index) or 'none'}")
            w[r, index[name]] = 1.0
        return w

    @contextlib.contextmanager
    def batch(self, rows: Sequence[str | None] | torch.Tensor):
        """Within the block, row ``b`` of every forward uses adapter ``rows[b]`` (or None).

        ``rows`` may also be a ``[B, n]`` weight tensor (a static mixture per row) or a callable
        ``MultiLoRALinear -> [B, n] | [B, T, n]`` (weights per layer and token; see :mod:`coe.adapters.mole`)."""
        prev = self.current
        self.current = self.prepare(rows)
        try:
            yield self
        finally:
            self.current = prev

    set_batch_adapters = batch

    def prepare(self, rows) -> BatchWeights | None:
        """The :class:`BatchWeights` for ``rows`` (None when no row uses an adapter)."""
        weights = rows if isinstance(rows, torch.Tensor) or callable(rows) else self.row_weights(rows)
        if isinstance(weights, torch.Tensor):
            if weights.shape[-1] != len(self.adapters):
                raise AdapterError(f"weights have {weights.shape[-1]} columns for {len(self.adapters)} adapters")
            if not weights.any():
                return None
        return BatchWeights(weights, len(self.adapters), self.mode)


class LoRAStepper:
    """A decoding stepper (:mod:`coe.adapters.decode`) for one mixed batch: row ``b`` uses ``rows[b]``."""

    def __init__(self, lora: MultiLoRA, rows: Sequence[str | None] | torch.Tensor) -> None:
        self.lora, self._cache = lora, None
        self._weights = lora.prepare(rows)  # built once: per-layer operands are reused every step

    def reset(self) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from coe.adapters.decode import call_model

        if self._cache is None:
            self.reset()
        prev, self.lora.current = self.lora.current, self._weights
        try:
            return call_model(self.lora.model, ids, mask, self._cache, logits_to_keep=1).logits[:, -1]
        finally:
            self.lora.current = prev
