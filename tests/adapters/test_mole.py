"""MoLE: per-layer gates over frozen experts; exact with a KV cache; trains; saves and loads."""

from __future__ import annotations

import pytest
import torch

from coe.adapters.decode import decode
from coe.adapters.mixtures import load_mixture
from coe.adapters.mole import MoLE
from coe.errors import AdapterError

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def _clean(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@torch.no_grad()
def test_uniform_gates_equal_peft_with_scaled_adapters(tiny_llama_dir, tiny_loras):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(_clean(tiny_llama_dir), str(tiny_loras[0]), adapter_name="a0")
    for i, p in enumerate(tiny_loras[1:], 1):
        peft_model.load_adapter(str(p), adapter_name=f"a{i}")
    peft_model.base_model.set_adapter(["a0", "a1", "a2"])
    from peft.tuners.lora import LoraLayer

    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            for name in m.lora_A:
                m.set_scale(name, 1 / 3)  # zero-initialised gates: weights 1/3 each
    want = peft_model(input_ids=IDS).logits
    mole = MoLE(_clean(tiny_llama_dir), [(f"a{i}", p) for i, p in enumerate(tiny_loras)])
    torch.testing.assert_close(mole(IDS).logits, want, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_cached_decoding_equals_full_forward(tiny_llama_dir, tiny_loras):
    mole = MoLE(_clean(tiny_llama_dir), [(f"a{i}", p) for i, p in enumerate(tiny_loras)], top_k=2)
    torch.manual_seed(0)
    for g in mole.gates.values():
        g.weight.normal_(0, 1.0)
    toks = torch.stack([t for t, _ in decode(mole, IDS, torch.ones_like(IDS), 5, eos_ids=set(), pad_id=3)], 1)
    full = torch.cat([IDS, toks], 1)
    logits = mole(full).logits  # no cache
    assert torch.equal(logits[:, IDS.shape[1] - 1 : -1].argmax(-1), toks)
    w = mole.last_weights[0]  # [B, T, n] of the last forward, after top-k
    assert w.shape[:2] == full.shape and w.shape[-1] == len(tiny_loras)
    assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones_like(w[..., 0]))


def test_training_lowers_loss_and_save_load_roundtrip(tiny_llama_dir, tiny_loras, tmp_path):
    from coe.adapters.mole_train import train_gates

    mole = MoLE(_clean(tiny_llama_dir), [(f"a{i}", p) for i, p in enumerate(tiny_loras)])
    rng = torch.Generator().manual_seed(0)
    examples = [(torch.randint(4, 40, (12,), generator=rng).tolist(), 6) for _ in range(8)]
    hist = train_gates(mole, examples, steps=15, batch_size=4, lr=0.05, pad_id=3, log=lambda *_: None)
    assert hist[-1]["ce"] < hist[0]["ce"]
    assert all(r["balance"] >= 1.0 - 1e-4 for r in hist)  # n·Σ f·P ≥ 1, equal when balanced
    mole.save(tmp_path / "mix", {f"a{i}": p for i, p in enumerate(tiny_loras)})
    again = load_mixture(tmp_path / "mix", _clean(tiny_llama_dir))
    assert isinstance(again, MoLE) and again.names == ["a0", "a1", "a2"]
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, mole(IDS).logits)


def test_bad_mixtures_are_refused(tiny_llama_dir, tiny_loras, tmp_path):
    with pytest.raises(AdapterError, match="at least 2"):
        MoLE(_clean(tiny_llama_dir), [("a0", tiny_loras[0])])
    with pytest.raises(AdapterError, match="top_k"):
        MoLE(_clean(tiny_llama_dir), [("a0", tiny_loras[0]), ("a1", tiny_loras[1])], top_k=3)
    with pytest.raises(AdapterError, match="mixture.json is missing"):
        load_mixture(tmp_path, _clean(tiny_llama_dir))
