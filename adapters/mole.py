"""MoLE: a learned gate per decoder layer over frozen LoRA experts.

For every decoder layer ``l`` that some adapter touches, a gate ``G_l`` (one linear layer,
``[n, H]`` + bias) reads the layer's input hidden state ``h`` (RMS-normalised, no parameters)
and gives per-token weights over the ``n`` experts::

    p = softmax(G_l(h / rms(h)) / temperature)                 # [B, T, n]
    w = p, or with top_k: p kept on its k largest, renormalised  # [B, T, n]

and every adapted linear layer of that decoder layer adds ``Σ_i w_i · B_i A_i x`` (the
:mod:`coe.adapters.multilora` kernel with per-token weights). Gates start at zero (a uniform
mixture). The gate only looks at the current token's hidden state, so a KV cache is exact.

Training (:func:`adapters.mole_train.train_gates`) freezes the model and the experts and fits the
gates on the answer tokens' cross-entropy plus ``balance_coef ×`` a Switch-style load-balance
loss, ``n · Σ_i f_i · P_i`` per layer (``f_i``: share of tokens whose top choice is ``i``,
``P_i``: mean gate probability of ``i``), averaged over layers.

Format on disk: ``mixture.json`` (``{"kind": "mole", "adapters": [...], "top_k", "temperature",
"layers": [decoder layer indices with a gate], "hidden_size"}``), ``gates.safetensors``
(``gate.<layer>.weight [n, H]``, ``gate.<layer>.bias [n]``) and one PEFT LoRA folder per
expert under ``adapters/<name>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from coe.adapters.decode import call_model
from coe.adapters.lora_weights import LoraWeights, load_lora
from coe.adapters.multilora import MultiLoRA, MultiLoRALinear
from coe.errors import AdapterError


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("model.layers", "model.decoder.layers", "transformer.h"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AdapterError(f"cannot find the decoder layers of {type(model).__name__} for MoLE gates")


class MoLE:
    """A MoLE mixture on a plain transformers causal LM; also a decoding stepper. Not thread-safe."""

    def __init__(
        self,
        model: nn.Module,
        adapters: list[tuple[str, str | Path | LoraWeights]],
        *,
        top_k: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        if len(adapters) < 2:
            raise AdapterError("a MoLE mixture needs at least 2 experts")
        if top_k is not None and not 1 <= top_k <= len(adapters):
            raise AdapterError(f"top_k must be between 1 and {len(adapters)} (the number of experts), got {top_k}")
        if temperature <= 0:
            raise AdapterError(f"temperature must be > 0, got {temperature}")
        self.model, self.top_k, self.temperature = model, top_k, temperature
        self.lora = MultiLoRA(model)
        for name, src in adapters:
            self.lora.add(name, src)
        layers = sorted({m.layer for m in model.modules() if isinstance(m, MultiLoRALinear) and m.layer >= 0})
        hidden = model.config.hidden_size
        p = next(model.parameters())
        self.gates = nn.ModuleDict({str(l): nn.Linear(hidden, len(adapters)) for l in layers}).to(p.dtype)
        for g in self.gates.values():
            nn.init.zeros_(g.weight)
            nn.init.zeros_(g.bias)
        self._weights: dict[int, torch.Tensor] = {}
        self._probs: dict[int, torch.Tensor] = {}
        decoder = _decoder_layers(model)
        self._hooks = [decoder[l].register_forward_pre_hook(self._gate_hook(l), with_kwargs=True) for l in layers]
        self._cache = None

    @property
    def names(self) -> list[str]:
        return self.lora.names

    def _gate_hook(self, layer: int):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
            if self.lora.current is None:
                return
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            p = torch.softmax(self.gates[str(layer)](h) / self.temperature, dim=-1)  # [B, T, n]
            self._probs[layer] = p
            self._weights[layer] = self._top_k(p)
            return

        return hook

    def _top_k(self, p: torch.Tensor) -> torch.Tensor:
        if self.top_k is None or self.top_k == p.shape[-1]:
            return p
        top = torch.topk(p, self.top_k, dim=-1)
        kept = torch.zeros_like(p).scatter(-1, top.indices, top.values)
        return kept / kept.sum(-1, keepdim=True)

    def _module_weights(self, module: MultiLoRALinear) -> torch.Tensor | None:
        return self._weights.get(module.layer)

    def balance_loss(self) -> torch.Tensor:
        """Switch-style load-balance loss of the last forward, averaged over gated layers."""
        losses = []
        for p in self._probs.values():
            flat = p.reshape(-1, p.shape[-1])  # [N, n]
            f = nn.functional.one_hot(flat.argmax(-1), flat.shape[-1]).to(flat.dtype).mean(0)
            losses.append(flat.shape[-1] * (f * flat.mean(0)).sum())
        return torch.stack(losses).mean()

    @property
    def last_weights(self) -> dict[int, torch.Tensor]:
        """The expert weights of the last forward, per gated decoder layer: ``[B, T, n]`` (after
        top-k), for gate reports. Empty before the first forward."""
        return dict(self._weights)

    # -- forward / stepper -----------------------------------------------------------------
    def __call__(self, ids, mask=None, cache=None, **kw):
        """A model forward with the mixture on (kwargs go to the model)."""
        mask = torch.ones_like(ids) if mask is None else mask
        self._weights.clear()
        self._probs.clear()
        with self.lora.batch(self._module_weights):
            return call_model(self.model, ids, mask, cache, **kw)

    def reset(self) -> None:
        from transformers import DynamicCache

        self._cache = DynamicCache()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            self.reset()
        return self(ids, mask, self._cache, logits_to_keep=1).logits[:, -1]

    # -- format ---------------------------------------------------------------------------
    def save(self, folder: str | Path, sources: dict[str, str | Path]) -> None:
        """Write the documented format; ``sources`` maps expert names to their PEFT folders."""
        import shutil

        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "adapters").mkdir(parents=True, exist_ok=True)
        for name in self.names:
            shutil.copytree(sources[name], folder / "adapters" / name, dirs_exist_ok=True)
        meta = {
            "kind": "mole",
            "adapters": self.names,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "layers": [int(k) for k in self.gates],
            "hidden_size": self.model.config.hidden_size,
        }
        (folder / "mixture.json").write_text(json.dumps(meta, indent=2) + "\n")
        state = {f"gate.{k}.{p}": t.detach().contiguous() for k, g in self.gates.items() for p, t in g.state_dict().items()}
        save_file(state, str(folder / "gates.safetensors"))

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module) -> MoLE:
        """Load a folder written by :meth:`save` onto ``model`` (AdapterError if it does not fit)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = read_mixture_meta(folder)
        if meta.get("kind") != "mole":
            raise AdapterError(f"{folder}: mixture kind {meta.get('kind')!r} is not 'mole'")
        if meta["hidden_size"] != model.config.hidden_size:
            raise AdapterError(f"{folder}: gates are for hidden size {meta['hidden_size']}, the model has {model.config.hidden_size}")
        experts = [(n, load_lora(folder / "adapters" / n, n)) for n in meta["adapters"]]
        mix = cls(model, experts, top_k=meta.get("top_k"), temperature=meta.get("temperature", 1.0))
        state = load_file(str(folder / "gates.safetensors"))
        for k, g in mix.gates.items():
            g.load_state_dict({p: state[f"gate.{k}.{p}"] for p in ("weight", "bias")})
        return mix


def read_mixture_meta(folder: str | Path) -> dict:
    """``mixture.json`` of a mixture folder (AdapterError when absent or unreadable)."""
    f = Path(folder) / "mixture.json"
    if not f.is_file():
        raise AdapterError(f"{folder} is not a mixture folder: mixture.json is missing")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{f} is not valid JSON: {exc}") from exc
