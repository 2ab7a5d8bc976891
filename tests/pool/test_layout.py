"""Flat layouts: a skeleton bound to a packed buffer computes exactly what the model computes."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_bound_skeleton_matches_model(tiny_experts):
    from coe.serving.pool.layout import layout_of
    from coe.serving.pool.store import build_skeleton

    model = _load(tiny_experts["e0"])
    layout = layout_of(model)
    flat = layout.empty("cpu")
    layout.pack(model, flat)
    skeleton = build_skeleton(model.config, torch.float32)
    layout.bind(skeleton, flat)
    assert all(t.device.type == "cpu" for t in skeleton.state_dict().values())
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    torch.testing.assert_close(_logits(skeleton, ids), _logits(model, ids), rtol=0, atol=0)


def test_copy_into_buffer_swaps_weights(tiny_experts):
    from coe.serving.pool.layout import layout_of
    from coe.serving.pool.store import build_skeleton

    a, b = _load(tiny_experts["e0"]), _load(tiny_experts["e1"])
    layout = layout_of(a)
    host_b = layout.empty("cpu")
    layout.pack(b, host_b)
    slot = layout.empty("cpu")
    layout.pack(a, slot)
    skeleton = build_skeleton(a.config, torch.float32)
    layout.bind(skeleton, slot)
    ids = torch.tensor([[1, 9, 10, 11]])
    assert not torch.equal(_logits(skeleton, ids), _logits(b, ids))
    slot.copy_(host_b)  # the swap: one copy of one buffer
    torch.testing.assert_close(_logits(skeleton, ids), _logits(b, ids), rtol=0, atol=0)


def test_views_are_aligned_and_disjoint(tiny_experts):
    from coe.serving.pool.layout import ALIGN, layout_of

    layout = layout_of(_load(tiny_experts["e0"]))
    spans = sorted((s.offset, s.offset + s.nbytes) for s in layout.specs)
    assert all(start % ALIGN == 0 for start, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in itertools.pairwise(spans))
    assert spans[-1][1] <= layout.nbytes
    names = [n for s in layout.specs for n in s.names]
    assert "model.rotary_emb.inv_freq" in names  # non-persistent buffers travel too


def test_tied_weights_share_one_view(tiny_llama_dir, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    from coe.serving.pool.layout import layout_of
    from coe.serving.pool.store import build_skeleton

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    cfg.tie_word_embeddings = True
    model = LlamaForCausalLM(cfg).eval()
    layout = layout_of(model)
    tied = [s for s in layout.specs if len(s.names) > 1 and s.kind == "param"]
    assert tied and {"lm_head.weight", "model.embed_tokens.weight"} <= set(tied[0].names)
    flat = layout.empty("cpu")
    layout.pack(model, flat)
    skeleton = build_skeleton(cfg, torch.float32)
    layout.bind(skeleton, flat)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(_logits(skeleton, ids), _logits(model, ids), rtol=0, atol=0)


def test_shape_key_separates_shapes(tiny_experts, odd_expert):
    from coe.serving.pool.layout import layout_of, shape_key

    a, b, odd = _load(tiny_experts["e0"]), _load(tiny_experts["e1"]), _load(odd_expert)
    assert shape_key(a) == shape_key(b)
    assert shape_key(a) != shape_key(odd)
    with pytest.raises(ValueError, match="architecture shape"):
        layout_of(a).pack(odd, layout_of(a).empty("cpu"))
