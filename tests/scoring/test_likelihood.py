"""Likelihood scorers (reference_nll, choice) and the shared teacher-forced helpers, tiny model."""

import math

import pytest

from coe.scoring import Probe, get_scorer, score
from coe.scoring.bootstrap import bootstrap_mean, paired_difference
from coe.scoring.likelihood import HFLikelihood, collate, encode_chat


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, tok


def _manual_logprobs(model, tok, query, answer):
    """Unbatched, unpadded reference: full logits, no logits_to_keep."""
    import torch

    ids, n = encode_chat(tok, query, answer)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [logp[t - 1, ids[t]].item() for t in range(len(ids) - n, len(ids))]


def test_batched_logprobs_match_unbatched(lm):
    model, tok = lm
    items = [("what is the capital of france ?", "paris"), ("hello", "the city of paris is the capital"),
             ("x + y", "1 2 3")]
    got = HFLikelihood(model, tok, batch_size=2).continuation_logprobs(items)
    for (q, a), lp in zip(items, got, strict=True):
        assert lp == pytest.approx(_manual_logprobs(model, tok, q, a), abs=1e-4)
    assert len(got[1]) == len(tok("the city of paris is the capital" + tok.eos_token, add_special_tokens=False)["input_ids"])


def test_too_long_items_give_none(lm):
    model, tok = lm
    assert HFLikelihood(model, tok, max_len=8).continuation_logprobs([("hello world", "paris " * 20)]) == [None]


def test_collate_left_pads_and_labels_only_the_answer():
    ids, mask, labels, keep = collate([([5, 6, 7, 8], 2), ([9, 10], 1)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [0, 0, 9, 10]] and mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 10]] and keep == 3


def test_reference_nll(lm):
    model, tok = lm
    like = HFLikelihood(model, tok)
    p = Probe(id="r", query="what is the capital of france ?", scorer="reference_nll", reference="paris")
    out = score(get_scorer("reference_nll"), p, None, likelihood=like)
    lp = _manual_logprobs(model, tok, p.query, "paris")
    assert out.passed and out.score == pytest.approx(-sum(lp) / len(lp), abs=1e-4)
    assert out.detail["tokens"] == len(lp)
    missing = Probe(id="m", query="q", scorer="exact_number", answer="1")
    assert get_scorer("reference_nll").score_batch([missing], likelihood=like)[0].reason == "task 'm' has no reference answer"


def test_choice_picks_the_most_likely_option(lm):
    model, tok = lm
    like = HFLikelihood(model, tok)
    opts = ["paris", "the city", "1 2 3 4 5"]
    sums = [sum(_manual_logprobs(model, tok, "capital of france ?", o)) for o in opts]
    best = opts[max(range(3), key=sums.__getitem__)]
    right = Probe(id="c", query="capital of france ?", scorer="choice", choices=opts, answer=best)
    wrong = right.model_copy(update={"answer": next(o for o in opts if o != best)})
    outs = get_scorer("choice").score_batch([right, wrong], likelihood=like)
    assert outs[0].passed and outs[0].detail["pred"] == best
    assert not outs[1].passed and outs[1].reason == f"chose {best!r}"


def test_choice_with_adapters_scores_under_the_adapter(lm, tiny_loras):
    import copy

    from coe.adapters.multilora import MultiLoRA

    model, tok = lm
    model = copy.deepcopy(model)
    lora = MultiLoRA(model)
    lora.add("a", tiny_loras[1])
    like = HFLikelihood(model, tok, lora=lora)
    items = [("hello", "paris")] * 2
    base, adapted = like.continuation_logprobs(items, [None, "a"])
    assert base != pytest.approx(adapted, abs=1e-6)
    assert like.continuation_logprobs(items[:1], [None])[0] == pytest.approx(base, abs=1e-5)


def test_bootstrap():
    iv = bootstrap_mean([1.0] * 50 + [0.0] * 50, resamples=2000)
    assert iv.mean == 0.5 and 0.35 < iv.lo < 0.5 < iv.hi < 0.65 and iv.n == 100
    d = paired_difference([1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5])
    assert d.mean == d.lo == d.hi == 0.5  # constant differences: no spread
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0], [1.0, 2.0])
    assert math.isfinite(bootstrap_mean([3.0]).hi)
