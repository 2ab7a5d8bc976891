"""Recruit-and-vote (Symbolic-MoE) policies: answer normalisation, the vote, cost, CV, ``coe eval --recruit``."""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

from coe.routers.base import Scores
from coe.routers.datasets import RoutingData
from coe.routers.recruit import Ballots, RecruitPolicy, cross_validate_recruit, detect_kind, sweep
from coe.scoring.answers import normalize_answer, vote


@pytest.mark.parametrize("kind, same, different", [
    ("number", ["1,000", "1000.0", "so the answer is 1000", "#### $1,000.00"], ["1000.5", "100"]),
    ("choice", ["(B)", "B", "b.", "B)\n", "Answer: B", "The answer is (B) Sarah"], ["A", "(A) Kyle", "I do"]),
    ("text", ["Paris.", " paris", "PARIS"], ["Lyon", ""]),
])
def test_normalisation_folds_spellings_of_one_answer(kind, same, different):
    forms = {normalize_answer(s, kind) for s in same}
    assert len(forms) == 1 and None not in forms
    for other in different:
        assert normalize_answer(other, kind) not in forms
    assert normalize_answer("I do", "choice") is None and normalize_answer("", "text") is None
    assert normalize_answer(None, kind) is None


def test_vote_majority_then_predicted_quality_breaks_ties():
    assert vote(["A", "B", "B"], [0.9, 0.5, 0.4]) == 1            # majority beats the best-ranked reply
    assert vote(["A", "B"], [0.4, 0.5]) == 1                      # a tie goes to the better-predicted expert
    assert vote(["A", "B"], [0.6, 0.5]) == 0
    assert vote(["B", "A", "B", "A"], [0.1, 0.3, 0.2, 0.9]) == 3   # 2-2: A's best supporter ranks highest
    assert vote([None, "A", None], [0.9, 0.1, 0.8]) == 1          # abstentions do not vote
    assert vote([None, None], [0.9, 0.1]) is None


def _data(answers, right, cost):
    """RoutingData whose replies are ``answers`` [N, M] and outcomes ``right`` [N, M]."""
    n, m = len(answers), len(answers[0])
    return RoutingData([f"q{i}" for i in range(n)], [f"e{j}" for j in range(m)], np.asarray(right, float),
                       np.tile(np.asarray(cost, float), (n, 1)), responses=np.asarray(answers, dtype=object))


def test_recruited_query_costs_the_sum_and_scores_the_voted_reply():
    # e0 is predicted best but is outvoted by e1 + e2 on q0; on q1 e1 and e2 disagree: tie -> e1 (ranked higher)
    data = _data([["A", "B", "B(", "A"], ["A", "B", "A", "B"]], [[0, 1, 1, 0], [1, 0, 1, 0]], [1.0, 2.0, 4.0, 8.0])
    scores = Scores([f"e{j}" for j in range(4)], np.array([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]]),
                    cost=np.array([1.0, 2.0, 4.0, 8.0]))
    ballots = Ballots(data.responses, "choice")
    assert ballots.codes[0, 2] == -1                              # "B(" names no option: abstains
    cost, quality, rep, size = sweep(RecruitPolicy(3), scores, data, ballots, [0.0, 1e6])
    assert cost[0].tolist() == [7.0, 7.0] and size.tolist() == [3, 3]
    assert cost[1].tolist() == [1.0, 1.0]                         # the sweep's last λ routes single, to the cheapest
    # q0: e0 "A" vs e1 "B" (e2 abstains): tie, e0 ranks higher; q1: "A" (e0, e2) beats "B" (e1)
    assert rep.tolist() == [0, 0] and quality[0].tolist() == [0.0, 1.0]
    cost, quality, rep, _ = sweep(RecruitPolicy(1), scores, data, ballots, [0.0, 1e6])
    assert cost[0].tolist() == [1.0, 1.0] and rep.tolist() == [0, 0]


def test_recruit_when_unsure_only_recruits_small_margins():
    q = np.array([[0.9, 0.2, 0.1], [0.5, 0.49, 0.1], [0.6, 0.55, 0.5]])
    p = RecruitPolicy(3, "margin", share=0.5).calibrated(q, np.ones(3), None)
    mask = p.mask(q, np.ones(3), 0.0)
    assert mask.sum(axis=1).tolist() == [1, 3, 3] or mask.sum(axis=1).tolist() == [1, 3, 1]
    assert mask[0].tolist() == [True, False, False]
    unc = np.array([[0.01, 0.3, 0.3], [0.2, 0.3, 0.3], [0.05, 0.3, 0.3]])
    pu = RecruitPolicy(2, "uncertainty", share=0.34).calibrated(q, np.ones(3), unc)
    assert pu.mask(q, np.ones(3), 0.0, unc).sum(axis=1).tolist() == [1, 2, 1]


def _synthetic(independent: bool, n: int = 300, seed: int = 0):
    """Three cheap experts (cost 1, right 70%) and a dear one (cost 10); two-option answers.

    ``independent``: the cheap experts err independently (a vote of three is right ~78%);
    otherwise they err together and the dear one is right on a further 10% (a vote only spoils)."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    if independent:
        right = rng.random((n, 4)) < [0.7, 0.7, 0.7, 0.75]
    else:
        base = rng.random(n) < 0.7
        right = np.stack([base, base, base, base | (rng.random(n) < 0.34)], axis=1)
    letters = np.array(["A", "B"])
    answers = np.where(right, letters[gold][:, None], letters[1 - gold][:, None])
    return _data(answers.tolist(), right.astype(float), [1.0, 1.0, 1.0, 10.0])


@pytest.mark.parametrize("independent", [True, False])
def test_cv_picks_recruiting_only_when_votes_help(independent):
    data = _synthetic(independent)
    assert detect_kind(data.responses, data.quality)[0] == "choice"
    cv = cross_validate_recruit("best-single", {}, data, np.zeros((len(data), 1)), Ballots(data.responses, "choice"),
                                folds=3)
    mean = {name: float(np.mean(v)) for name, v in cv.items()}
    best = max(mean, key=mean.get)
    assert len(cv["single"]) == 3
    if independent:
        assert best.startswith("recruit") and mean[best] > mean["single"] + 0.02
    else:
        assert mean["single"] >= max(mean.values()) - 1e-12
        assert mean["recruit-3"] < mean["single"] - 0.01


def _slice(src, dst, rows):
    csv.field_size_limit(sys.maxsize)
    with src.open(newline="") as f, dst.open("w", newline="") as g:
        writer = csv.writer(g)
        for i, row in enumerate(csv.reader(f)):
            if i > rows:
                break
            writer.writerow(row)
    return dst


def test_coe_eval_recruit_end_to_end(shared_data, minilm_dir, tmp_path):
    from coe.tools.cli import main

    src = shared_data / "routing"
    train = _slice(src / "winograde_train.csv", tmp_path / "train.csv", 120)
    test = _slice(src / "winograde_test.csv", tmp_path / "test.csv", 60)
    out = tmp_path / "r"
    assert main(["eval", "--train", str(train), "--test", str(test), "--out", str(out), "--quiet", "--folds", "3",
                 "--bootstrap", "50", "--router", "knn", "--recruit"]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [n for n in report["routers"] if n.startswith("recruit")]
    assert {"recruit-2", "recruit-3", "recruit-5", "recruit-3-margin", "recruit-3-unc"} <= set(names)
    rec = report["recruit"]
    assert rec["router"] == "knn" and rec["answer_kind"] == "choice" and rec["consistency_test"] == 1.0
    assert rec["selected"]["single_cv_aiq"] == pytest.approx(report["routers"]["knn"]["cv"]["cv_aiq"])
    for name in names:
        r = report["routers"][name]
        assert abs(sum(r["shares"].values()) - 1) < 1e-9 and "vs_knn" in r["ci"]
    # recruiting every query costs at least the cheapest 3 experts, except at the sweep's last λ (single, cheapest)
    costs = sorted(v["cost"] for v in report["single_models"].values())
    curve = [p["cost"] for p in report["routers"]["recruit-3"]["curve"]]
    assert min(curve[:-1]) >= sum(costs[:3]) * 0.999 and curve[-1] == pytest.approx(costs[0], rel=0.05)
    assert (out / "recruit_cost_quality.png").stat().st_size > 10_000
    assert "## Recruit and vote" in (out / "report.md").read_text()
