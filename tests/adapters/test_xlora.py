"""X-LoRA with a KV cache agrees with PEFT's X-LoRA (which runs without one)."""

from __future__ import annotations

import pytest
import torch

from coe.adapters.decode import decode
from coe.adapters.xlora import XLoRA

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def _peft_xlora(tiny_llama_dir, loras, **kw):
    from peft import XLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base.config.use_cache = False
    cfg = XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=64, adapters={str(i): str(p) for i, p in enumerate(loras)}, **kw
    )
    torch.manual_seed(7)
    model = get_peft_model(base, cfg).eval()
    with torch.no_grad():  # make the classifier's choice matter
        for p in model.base_model.internal_xlora_classifier.parameters():
            p.normal_(0, 0.5)
    return model


def _clean(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.mark.parametrize(
    "kw",
    [
        dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True),
        dict(xlora_depth=1, top_k_lora=2, enable_softmax=False, enable_softmax_topk=True),
    ],
)
@torch.no_grad()
def test_prompt_logits_and_greedy_tokens_match_peft(tiny_llama_dir, tiny_loras, kw, tmp_path):
    peft_model = _peft_xlora(tiny_llama_dir, tiny_loras, **kw)
    want = peft_model(input_ids=IDS).logits
    mix = XLoRA.from_peft(peft_model, _clean(tiny_llama_dir))
    torch.testing.assert_close(mix.logits(IDS), want, atol=1e-5, rtol=1e-4)
    # the cached path: prompt logits at the last position, then token by token
    mask = torch.ones_like(IDS)
    mix.reset()
    torch.testing.assert_close(mix.forward(IDS, mask), want[:, -1], atol=1e-5, rtol=1e-4)
    ref = peft_model.generate(input_ids=IDS, max_new_tokens=6, do_sample=False, pad_token_id=3)
    got = torch.stack([t for t, _ in decode(mix, IDS, mask, 6, eos_ids=set(), pad_id=3)], dim=1)
    assert torch.equal(got, ref[:, IDS.shape[1] :])
    # save / load keeps the mixture
    mix.save(tmp_path / "x", {str(i): p for i, p in enumerate(tiny_loras)})
    again = XLoRA.load(tmp_path / "x", _clean(tiny_llama_dir))
    torch.testing.assert_close(again.logits(IDS), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_loads_a_peft_xlora_checkpoint(tiny_llama_dir, tiny_loras, tmp_path, depth):
    """Including the classifier, which peft's own reload re-initialises (see _saved_classifier)."""
    peft_model = _peft_xlora(tiny_llama_dir, tiny_loras[:2], xlora_depth=depth, xlora_size=8)
    want = peft_model(input_ids=IDS).logits
    peft_model.save_pretrained(tmp_path / "peft-xlora")
    mix = XLoRA.from_peft_checkpoint(tmp_path / "peft-xlora", tiny_llama_dir)
    torch.testing.assert_close(mix.logits(IDS), want, atol=1e-5, rtol=1e-4)
