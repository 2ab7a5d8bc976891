"""The fast mixed-batch path gives peft's logits, row by row, with and without a KV cache."""

from __future__ import annotations

import json

import pytest
import torch

from coe.adapters.multilora import MultiLoRA
from coe.errors import AdapterError


def _base(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _peft(tiny_llama_dir, loras):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(tiny_llama_dir), str(loras[0]), adapter_name="a0")
    for i, p in enumerate(loras[1:], 1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    return model.eval()


IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22], [5, 9, 11, 7, 6, 8]])


@pytest.mark.parametrize("mode", ["dense", "gather"])
@torch.no_grad()
def test_mixed_batch_matches_peft_per_adapter(tiny_llama_dir, tiny_loras, mode):
    peft_model = _peft(tiny_llama_dir, tiny_loras)
    rows = ["a0", "a1", "a2", "__base__"]
    want = peft_model(input_ids=IDS, adapter_names=rows).logits
    model = _base(tiny_llama_dir)
    ml = MultiLoRA(model, mode=mode)
    for i, p in enumerate(tiny_loras):
        ml.add(f"a{i}", p)
    plain = model(input_ids=IDS).logits
    with ml.batch(["a0", "a1", "a2", None]):
        got = model(input_ids=IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], plain[0], atol=1e-3)  # the adapters do change the logits
    torch.testing.assert_close(model(input_ids=IDS).logits, plain)  # outside the block: base model


@pytest.mark.parametrize("mode", ["auto", "gather"])
@torch.no_grad()
def test_subset_of_adapters_and_generate_with_cache(tiny_llama_dir, tiny_loras, mode):
    peft_model = _peft(tiny_llama_dir, tiny_loras)
    model = _base(tiny_llama_dir)
    ml = MultiLoRA(model, mode=mode)
    for i, p in enumerate(tiny_loras):
        ml.add(f"a{i}", p)
    rows = ["a1", None, "a1", "a2"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=3)
    want = peft_model.generate(input_ids=IDS, adapter_names=[r or "__base__" for r in rows], **kw)
    with ml.batch(rows):
        got = model.generate(input_ids=IDS, **kw)
    assert torch.equal(got, want)


@torch.no_grad()
def test_rslora_alpha_pattern_and_remove(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(4)
    cfg = LoraConfig(
        r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 3}, alpha_pattern={"down_proj": 9},
    )
    pm = get_peft_model(_base(tiny_llama_dir), cfg)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "rs")
    want = PeftModel.from_pretrained(_base(tiny_llama_dir), str(tmp_path / "rs")).eval()(input_ids=IDS).logits
    model = _base(tiny_llama_dir)
    ml = MultiLoRA(model)
    ml.add("rs", tmp_path / "rs")
    with ml.batch(["rs"] * 4):
        torch.testing.assert_close(model(input_ids=IDS).logits, want, atol=1e-5, rtol=1e-4)
    ml.remove("rs")
    assert ml.names == []
    with pytest.raises(AdapterError, match="unknown adapter 'rs'"), ml.batch(["rs"] * 4):
        pass


def test_bad_adapters_are_refused(tiny_llama_dir, tiny_loras, tmp_path):
    ml = MultiLoRA(_base(tiny_llama_dir))
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        ml.add("x", tmp_path)
    ml.add("a0", tiny_loras[0])
    with pytest.raises(AdapterError, match="already loaded"):
        ml.add("a0", tiny_loras[0])
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((tiny_loras[0] / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        ml.add("d", dora)


def test_adapter_for_another_model_is_refused(tiny_llama_dir):
    from coe.adapters.lora_weights import LoraWeights

    ml = MultiLoRA(_base(tiny_llama_dir))
    wrong_shape = LoraWeights("w", "<mem>", {"model.layers.0.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(64, 2))})
    with pytest.raises(AdapterError, match="another base model"):
        ml.add("w", wrong_shape)
    no_module = LoraWeights("n", "<mem>", {"model.layers.9.self_attn.q_proj": (torch.zeros(2, 64), torch.zeros(64, 2))})
    with pytest.raises(AdapterError, match="not a linear layer of this model"):
        ml.add("n", no_module)
    assert ml.names == []
