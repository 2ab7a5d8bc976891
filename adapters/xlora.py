"""X-LoRA with a KV cache: PEFT's X-LoRA mixture, computed incrementally.

What X-LoRA computes (peft ``tuners/xlora``), per token ``t``:

1. *Scaling pass*: the base model with every adapter disabled runs over the sequence; the last
   hidden state ``h_t`` (``hidden_states[-1]``) goes through the classifier (an MLP, depth
   ``xlora_depth``) giving logits ``[n_layers, n]`` (or ``[n]`` broadcast to every layer when
   ``layerwise_scalings`` is off), softmaxed over the ``n`` adapters at ``softmax_temperature``.
   ``n_layers`` counts LoRA-wrapped *modules* in model order, not decoder layers.
2. Per module: optional ``top_k_lora`` (others zeroed) and ``enable_softmax_topk`` (softmax over
   the kept ones); the module adds ``Σ_i s_i · global_scaling_weight · B_i A_i x``.
3. *Real pass*: the model with those per-token, per-module scalings gives the logits.

PEFT's ``generate`` forces ``use_cache=False``, so every new token re-runs both passes over the
whole sequence. Here both passes keep their own KV cache: the scaling pass is the plain base
model, which is causal, so ``h_t`` — hence token ``t``'s scalings — depends only on tokens
``≤ t`` and is the same whether computed over the whole sequence or one token at a time. So the
prompt's scalings come from one scaling pass over the prompt (base cache filled), each new
token's scalings from one base step on that token, and the real pass reuses the scalings of the
earlier tokens through its own cache. The result equals PEFT's no-cache path up to floating-point
rounding (the test checks the prompt's logits and greedy tokens); the cost per new token is two
one-token steps instead of two full passes.

Format on disk (:meth:`XLoRA.save` / :meth:`XLoRA.load`): ``mixture.json`` (``"kind": "xlora"``,
the adapter names in order and the fields of :class:`XLoRAConfig`), ``classifier.safetensors`` (peft's
classifier ``layers.*`` state dict) and one PEFT LoRA folder per adapter under ``adapters/<name>``.
A PEFT X-LoRA model in memory converts with :meth:`XLoRA.from_peft`; a PEFT X-LoRA checkpoint
folder (``save_pretrained``) loads with :meth:`XLoRA.from_peft_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from coe.adapters.decode import call_model
from coe.adapters.lora_weights import LoraWeights, load_lora
from coe.adapters.multilora import MultiLoRA, MultiLoRALinear
from coe.errors import AdapterError


class XLoRAConfig(BaseModel):
    """peft ``XLoraConfig``'s inference-relevant fields (same names, same meaning)."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(gt=0, description="hidden size of the base model")
    xlora_depth: int = Field(1, ge=1, description="classifier layers")
    xlora_size: int = Field(2048, gt=0, description="classifier hidden width (depth > 1)")
    layerwise_scalings: bool = Field(False, description="one scaling vector per LoRA module")
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    softmax_temperature: float = Field(1.0, gt=0)
    top_k_lora: int | None = Field(None, ge=1)
    global_scaling_weight: float = 1.0


def build_classifier(cfg: XLoRAConfig, n_classes: int, n_layers: int) -> nn.Sequential:
    """The classifier with peft's module layout (so its state dict loads unchanged)."""
    out = n_classes * n_layers if cfg.layerwise_scalings else n_classes
    if cfg.xlora_depth == 1:
        return nn.Sequential(nn.Linear(cfg.hidden_size, out))
    layers: list[nn.Module] = [nn.Linear(cfg.hidden_size, cfg.xlora_size), nn.ReLU(), nn.Dropout(0.0)]
    for _ in range(cfg.xlora_depth - 2):
        layers += [nn.Linear(cfg.xlora_size, cfg.xlora_size), nn.ReLU(), nn.Dropout(0.0)]
    return nn.Sequential(*layers, nn.Linear(cfg.xlora_size, out))


class XLoRA:
    """An X-LoRA mixture over LoRA adapters on a plain transformers causal LM.

    Also a decoding *stepper* (:mod:`coe.adapters.decode`): ``reset()`` then ``forward(ids, mask)``.
    Not thread-safe."""

    def __init__(self, model: nn.Module, adapters: list[tuple[str, str | Path | LoraWeights]], cfg: XLoRAConfig):
        if len(adapters) < 2:
            raise AdapterError("an X-LoRA mixture needs at least 2 adapters")
        self.model, self.cfg = model, cfg
        self.lora = MultiLoRA(model)
        for name, src in adapters:
            self.lora.add(name, src)
        self.modules: list[MultiLoRALinear] = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
        self.index = {id(m): i for i, m in enumerate(self.modules)}
        n = len(adapters)
        dtype = next(model.parameters()).dtype
        self.classifier = build_classifier(cfg, n, len(self.modules)).to(dtype).eval()
        self._caches = None

    @property
    def n_adapters(self) -> int:
        return len(self.lora.names)

    # -- scalings -------------------------------------------------------------------------
    def scalings(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, n_layers, n]`` scalings from the scaling pass's last hidden state ``[B, T, H]``."""
        B, T, _ = hidden.shape
        logits = self.classifier(hidden)
        if not self.cfg.layerwise_scalings:
            logits = logits.unsqueeze(2).expand(-1, -1, len(self.modules), -1)
        s = logits.reshape(B, T, len(self.modules), self.n_adapters)
        if self.cfg.enable_softmax:
            s = torch.softmax(s / self.cfg.softmax_temperature, dim=-1)
        return s

    def _module_weights(self, s: torch.Tensor):
        """A ``MultiLoRA`` weight callable: module → ``[B, T, n]`` (top-k, softmax-top-k, global weight)."""
        k, cfg = self.cfg.top_k_lora, self.cfg

        def weights(module: MultiLoRALinear) -> torch.Tensor:
            w = s[:, :, self.index[id(module)], :]  # [B, T, n]
            if k is not None:
                top = torch.topk(w, k=k, dim=-1).indices
                w = w * torch.zeros_like(w, dtype=torch.bool).scatter_(-1, top, True).to(w.dtype)
            if cfg.enable_softmax_topk:
                keep = w != 0
                w = torch.softmax(w.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
            return w * cfg.global_scaling_weight

        return weights

    def scaling_pass(self, ids, mask, cache=None) -> torch.Tensor:
        """Base model (adapters off), ``hidden_states[-1]`` → scalings ``[B, T, L, n]``."""
        with self.lora.batch(torch.zeros(ids.shape[0], self.n_adapters)):  # all-zero: plain base
            out = call_model(self.model.base_model, ids, mask, cache, output_hidden_states=True)
        return self.scalings(out.hidden_states[-1]), out.past_key_values

    # -- forward / stepper -----------------------------------------------------------------
    def logits(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All positions' logits ``[B, T, V]`` for a whole sequence, no cache (PEFT's forward)."""
        mask = torch.ones_like(ids) if mask is None else mask
        with torch.no_grad():
            s, _ = self.scaling_pass(ids, mask)
            with self.lora.batch(self._module_weights(s)):
                return call_model(self.model, ids, mask, None).logits

    def reset(self) -> None:
        from transformers import DynamicCache

        self._caches = (DynamicCache(), DynamicCache())

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cached step: both passes over the new tokens only; returns the last logits ``[B, V]``."""
        if self._caches is None:
            self.reset()
        base_cache, lora_cache = self._caches
        s, _ = self.scaling_pass(ids, mask, base_cache)
        with self.lora.batch(self._module_weights(s)):
            out = call_model(self.model, ids, mask, lora_cache, logits_to_keep=1)
        return out.logits[:, -1]

    # -- formats --------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, peft_model, model: nn.Module) -> XLoRA:
        """Copy a peft X-LoRA model's adapters and classifier onto ``model`` (a clean base model)."""
        from peft.tuners import lora

        xl = peft_model.base_model
        pcfg = xl.xlora_config if hasattr(xl, "xlora_config") else peft_model.peft_config["default"]
        names = list(pcfg.adapters)
        weights = {n: LoraWeights(name=n, path="<peft>") for n in names}
        inner = xl.lora_model.model
        for mod_name, mod in inner.named_modules():
            if isinstance(mod, lora.Linear):
                for n in names:
                    if n in mod.lora_A:
                        a, b = mod.lora_A[n].weight.detach(), mod.lora_B[n].weight.detach()
                        weights[n].modules[mod_name] = (a.clone(), (b * mod.scaling[n]).clone())
        cfg = XLoRAConfig(**{k: getattr(pcfg, k) for k in XLoRAConfig.model_fields})
        mix = cls(model, [(n, weights[n]) for n in names], cfg)
        mix.classifier.load_state_dict(xl.internal_xlora_classifier.layers.state_dict())
        return mix

    @classmethod
    def from_peft_checkpoint(cls, folder: str | Path, model_dir: str | Path, **load_kw) -> XLoRA:
        """Load a folder written by peft's ``XLoraModel.save_pretrained`` (peft reads it, on a
        cache-less copy of the base model as it requires), then copy it onto a clean model."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(model_dir, **load_kw)
        base.config.use_cache = False
        try:
            peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise AdapterError(f"cannot load the PEFT X-LoRA checkpoint {folder}: {exc}") from exc
        if type(peft_model.base_model).__name__ != "XLoraModel":
            raise AdapterError(f"{folder} is a PEFT checkpoint but not an X-LoRA one")
        mix = cls.from_peft(peft_model, AutoModelForCausalLM.from_pretrained(model_dir, **load_kw).eval())
        mix.classifier.load_state_dict(_saved_classifier(Path(folder), mix.classifier))
        return mix

    def save(self, folder: str | Path, sources: dict[str, str | Path]) -> None:
        """Write the documented format; ``sources`` maps adapter names to their PEFT folders."""
        import shutil

        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "adapters").mkdir(parents=True, exist_ok=True)
        for name in self.lora.names:
            shutil.copytree(sources[name], folder / "adapters" / name, dirs_exist_ok=True)
        meta = {"kind": "xlora", "adapters": self.lora.names, **self.cfg.model_dump()}
        (folder / "mixture.json").write_text(json.dumps(meta, indent=2) + "\n")
        state = {k: v.contiguous() for k, v in self.classifier.state_dict().items()}
        save_file(state, str(folder / "classifier.safetensors"))

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module) -> XLoRA:
        from safetensors.torch import load_file

        from coe.adapters.mole import read_mixture_meta

        folder = Path(folder)
        meta = read_mixture_meta(folder)
        if meta.pop("kind", None) != "xlora":
            raise AdapterError(f"{folder}: mixture.json does not describe an X-LoRA mixture")
        names = meta.pop("adapters")
        mix = cls(model, [(n, load_lora(folder / "adapters" / n, n)) for n in names], XLoRAConfig(**meta))
        mix.classifier.load_state_dict(load_file(str(folder / "classifier.safetensors")))
        return mix


def _saved_classifier(folder: Path, classifier: nn.Module) -> dict:
    """The classifier weights as saved by peft's X-LoRA.

    peft 0.21 reloads an X-LoRA checkpoint with a freshly initialised classifier: on saving it
    strips ``.<adapter name>`` from keys, and with adapters named "0", "1", … that also strips
    the ``Sequential`` index of ``layers.0`` (saved as ``layers.weight``). The tensors are in
    the folder's ``adapter_model.safetensors`` files; this collects them and restores the keys."""
    from safetensors.torch import load_file

    prefix = "base_model.internal_xlora_classifier.layers."
    found: dict = {}
    for f in sorted(folder.rglob("adapter_model.safetensors")):
        for key, t in load_file(str(f)).items():
            if key.startswith(prefix):
                sub = key[len(prefix) :]
                found["0." + sub if sub in ("weight", "bias") else sub] = t
    want = classifier.state_dict()
    if set(found) != set(want) or any(found[k].shape != want[k].shape for k in want):
        raise AdapterError(
            f"{folder}: classifier weights do not match the X-LoRA config "
            f"(found {sorted(found)}, expected {sorted(want)})"
        )
    return found
