"""Probe selection for a new expert (coe.routers.probe_selection) on synthetic 2PL outcome matrices."""

from __future__ import annotations

import numpy as np
import pytest

from coe.routers.probe_selection import ItemBank, choose_probes, next_probes, round_robin_order


def two_pl(n_items: int = 300, thetas=(-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5), seed: int = 0):
    """(outcomes [N, M] 0/1, a [N], d [N]) drawn from a 2PL model."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.5, n_items)
    d = rng.normal(0, 1.5, n_items)
    p = 1 / (1 + np.exp(-(a[:, None] * np.asarray(thetas)[None, :] - d[:, None])))
    return (rng.random(p.shape) < p).astype(float), a, d


def test_the_bank_orders_experts_and_estimates_a_new_one():
    y, _, d = two_pl()
    bank = ItemBank.fit(y)
    assert np.all(np.diff(bank.theta) > 0)                     # the experts' abilities come out in order
    assert np.corrcoef(bank.d, d)[0, 1] > 0.7                  # and (roughly, from 7 outcomes) the difficulties
    strong, _, _ = two_pl(thetas=(1.2,), seed=5)                # a new expert, same probes
    weak, _, _ = two_pl(thetas=(-1.2,), seed=5)
    everything = np.arange(len(y))
    hi, lo = bank.ability(everything, strong[:, 0]), bank.ability(everything, weak[:, 0])
    assert hi.theta > 0.5 > -0.5 > lo.theta
    few = bank.ability(everything[:10], strong[:10, 0])
    assert few.se > hi.se and bank.ability([], []).se > few.se    # the SE shrinks as outcomes come in
    pred = bank.predict(everything[:10], strong[:10, 0])
    assert pred.shape == (len(y),) and np.array_equal(pred[:10], strong[:10, 0]) and ((pred >= 0) & (pred <= 1)).all()


def test_soft_outcomes_on_any_scale():
    y, _, _ = two_pl(100)
    bank = ItemBank.fit(0.2 + 0.6 * y)       # e.g. probabilities of the right option
    assert bank.bounds == pytest.approx((0.2, 0.8))
    pred = bank.predict([0, 1], [0.8, 0.2])
    assert pred.min() >= 0.2 and pred.max() <= 0.8 and pred[0] == 0.8
    with pytest.raises(ValueError, match="at least 2 experts"):
        ItemBank.fit(y[:, :1])


def test_information_waves_pin_down_the_ability_faster_than_random():
    y, _, _ = two_pl(400, seed=1)
    bank = ItemBank.fit(y)
    se = {"information": [], "random": []}
    for k, theta in enumerate((-1.0, 0.0, 1.0, 2.0)):
        truth, _, _ = two_pl(400, thetas=(theta,), seed=1)
        for strategy in ("information", "random"):
            asked, got = choose_probes(strategy, y, lambda idx, t=truth: t[idx, 0], 30, wave=5, bank=bank, seed=k)
            assert len(asked) == 30 == len(set(asked.tolist())) and np.array_equal(got, truth[asked, 0])
            se[strategy].append(bank.ability(asked, got).se)
    assert np.mean(se["information"]) < 0.9 * np.mean(se["random"])


def test_information_skips_probes_every_expert_agrees_on():
    y, _, _ = two_pl(200, seed=2)
    y[:50] = 1.0                               # everyone right: tells nothing about a new expert
    y[50:100] = 0.0
    bank = ItemBank.fit(y)
    first = next_probes("information", len(y), [], [], 20, bank=bank)
    assert (first >= 100).all()


def test_adaptive_covers_every_cluster_before_repeating_one():
    rng = np.random.default_rng(0)
    centres = np.eye(8)                                         # 8 well-separated query clusters
    sizes = [60, 40, 20, 10, 10, 5, 5, 3]
    emb = np.concatenate([c + 0.05 * rng.normal(size=(k, 8)) for c, k in zip(centres, sizes)])
    label = np.repeat(np.arange(8), sizes)
    pattern, _, _ = two_pl(8, seed=3)                           # the experts do alike within a cluster
    y = pattern[label]
    bank = ItemBank.fit(y, embeddings=emb)
    first = next_probes("adaptive", len(emb), [], [], 8, bank=bank)
    assert sorted(label[first].tolist()) == list(range(8))    # one probe per cluster, small ones included
    # waves continue the same greedy cover: two waves of 4 are one wave of 8
    a = next_probes("adaptive", len(emb), [], [], 4, bank=bank)
    b = next_probes("adaptive", len(emb), a, y[a, 0], 4, bank=bank)
    assert np.array_equal(np.concatenate([a, b]), first)
    asked, got = choose_probes("adaptive", y, lambda idx: y[idx, 0], 8, wave=3, bank=bank)
    assert np.array_equal(asked, first) and np.array_equal(got, y[first, 0])


def test_adaptive_without_embeddings_covers_the_outcome_patterns():
    y, _, _ = two_pl(120, seed=4)
    y[:60] = 1.0                                                # half the probes: everyone right
    bank = ItemBank.fit(y)
    assert bank.features.shape == (120, y.shape[1])
    first = next_probes("adaptive", 120, [], [], 10, bank=bank)
    assert len(set(first.tolist())) == 10 and (first >= 60).sum() >= 5
    with pytest.raises(ValueError, match="3 probe embeddings for 120 probes"):
        ItemBank.fit(y, embeddings=np.ones((3, 4)))


def test_random_and_round_robin_are_fixed_orders_that_never_repeat():
    a = next_probes("random", 50, [], [], 10, seed=3)
    b = next_probes("random", 50, a, np.zeros(10), 10, seed=3)
    order = np.random.default_rng(3).permutation(50)
    assert np.array_equal(np.concatenate([a, b]), order[:20])
    assert not np.array_equal(a, next_probes("random", 50, [], [], 10, seed=4))
    cats = ["math", "math", "code", "code", "chat"]             # the live profile job's rule
    assert round_robin_order(5, cats).tolist() == [0, 2, 4, 1, 3]
    assert next_probes("round_robin", 5, [0, 2], [1, 1], 2, categories=cats).tolist() == [4, 1]
    assert next_probes("round_robin", 3, [], [], 5).tolist() == [0, 1, 2]      # runs out: fewer come back
    assert next_probes("random", 3, [0, 1, 2], [1, 1, 1], 5).size == 0


def test_bad_strategy_or_missing_bank():
    with pytest.raises(ValueError, match="unknown probe strategy 'best'"):
        next_probes("best", 10, [], [], 2)
    for strategy in ("adaptive", "information"):
        with pytest.raises(ValueError, match="needs an ItemBank"):
            next_probes(strategy, 10, [], [], 2)
