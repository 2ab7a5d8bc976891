"""``coe eval new-expert`` (coe.routers.new_expert) and the two train-only fixes of issue 23 item 7."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coe.routers.datasets import RoutingData
from coe.routers.new_expert import NewExpertSetup, masked_profile, simulate

KEYS = {"strategy", "budget", "aiq", "top_quality", "recovered", "recovered_ci", "brier"}


def clustered(n: int, seed: int, models: int = 4, dim: int = 8):
    """(RoutingData, unit embeddings [n, dim]): model k is right on cluster k, the others at random."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:models] * 3
    kind = rng.integers(0, models, n)
    x = centres[kind] + rng.normal(0, 1, (n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    p = np.full((n, models), 0.35)
    p[np.arange(n), kind] = 0.95
    y = (rng.random(p.shape) < p).astype(float)
    cost = np.tile(np.linspace(1.0, 2.0, models), (n, 1))
    return RoutingData([f"q{seed}-{i}" for i in range(n)], [f"m{k}" for k in range(models)], y, cost,
                       source=f"synthetic-{seed}"), x.astype(np.float32)


def test_masked_profile_observes_only_the_asked_probes():
    train, x = clustered(80, 0)
    asked = np.array([3, 10, 40])
    for impute in ("knn", "irt"):
        from coe.routers.probe_selection import ItemBank

        bank = ItemBank.fit(train.quality[:, [0, 2, 3]])
        data = masked_profile(train, x, 1, asked, impute=impute, bank=bank)
        assert data.observed[:, [0, 2, 3]].all() and data.observed[:, 1].sum() == 3
        assert np.array_equal(data.quality[asked, 1], train.quality[asked, 1])
        assert np.array_equal(data.quality[:, [0, 2, 3]], train.quality[:, [0, 2, 3]])
        filled = data.quality[~data.observed[:, 1], 1]
        assert np.isfinite(filled).all() and filled.min() >= 0 and filled.max() <= 1


@pytest.mark.parametrize("router", ["knn", "irt"])
def test_simulation_recovers_everything_with_the_whole_profile(router):
    """Any router that fits on outcomes works (``irt`` reads the mask, ``knn`` the filled cells); a
    budget of every train probe is the full profile, so it recovers exactly the full gain."""
    train, x = clustered(60, 1)
    test, xt = clustered(40, 2)
    setup = NewExpertSetup(budgets=[5, 60], seeds=2, router=router, n_boot=30,
                           params={"max_iter": 30, "dim": 1} if router == "irt" else {})
    report = simulate(train, test, x, xt, setup)
    summary = report["summary"]
    assert [(r["strategy"], r["budget"]) for r in summary] == [(s, b) for s in setup.strategies for b in (5, 60)]
    assert all(KEYS <= set(r) for r in summary)
    counted = report["reference"]["counted_models"]
    assert counted, "every specialist moves AIQ on its own cluster"
    for r in summary:
        lo, hi = r["recovered_ci"]
        assert lo <= hi and 0 <= r["brier"] <= 1
        if r["budget"] == 60:
            assert r["recovered"] == pytest.approx(1.0) and r["aiq"] == pytest.approx(report["reference"]["aiq_full"])
    adaptive = next(r for r in summary if r["strategy"] == "adaptive" and r["budget"] == 5)
    assert set(adaptive["vs_random"]) == {"recovered", "aiq"}


def test_simulation_refuses_bad_setups():
    from coe.errors import ConfigError

    train, x = clustered(30, 3)
    for bad, msg in ((NewExpertSetup(strategies=["best"]), "unknown best"),
                     (NewExpertSetup(impute="mean"), "--impute 'mean'"),
                     (NewExpertSetup(router="oracle"), "reads the true outcomes")):
        with pytest.raises(ConfigError, match=msg):
            simulate(train, train, x, x, bad)


def _rdc7_slice(src, dst, rows: int):
    dst.write_text(json.dumps(json.loads(src.read_text())[:rows]))
    return dst


def test_cli_end_to_end_on_a_slice_of_rdc7(shared_data, minilm_dir, tmp_path, capsys):
    from coe.tools.cli import main

    rdc7 = shared_data / "routing" / "rdc7"
    train = _rdc7_slice(rdc7 / "humaneval_train.json", tmp_path / "train.json", 40)
    test = _rdc7_slice(rdc7 / "humaneval_test.json", tmp_path / "test.json", 24)
    out = tmp_path / "ne"
    assert main(["eval", "new-expert", "--train", str(train), "--test", str(test), "--budgets", "5,10",
                 "--seeds", "2", "--bootstrap", "20", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["summary"]) == 8 and all(KEYS <= set(r) for r in report["summary"])   # 4 strategies x 2
    assert len(report["models"]) == 7 and "every model costs 1" in report["costs"]
    assert (out / "aiq_budget.png").stat().st_size > 0 and "| adaptive | 10 |" in (out / "report.md").read_text()
    assert "report:" in capsys.readouterr().out
    # the plain `coe eval` keeps its own required options
    with pytest.raises(SystemExit):
        main(["eval", "--train", str(train)])
    assert main(["eval", "new-expert", "--train", str(train), "--split", "0.5", "--strategies", "best",
                 "--out", str(out)]) == 2
    assert "unknown best" in capsys.readouterr().err


# ------------------------------------------------------------------------ item 7: train only


def test_fallback_threshold_is_calibrated_on_train_only(monkeypatch):
    """``coe eval``'s ``+fallback`` variants set their threshold on out-of-fold training scores: the
    calibration sees as many rows as train has, and never a test query."""
    from coe.routers import evaluate
    from coe.routers.report import EvalInputs, run_eval

    train, x = clustered(60, 4)
    test, xt = clustered(25, 5)
    seen = []
    real = evaluate.calibrate_fallback

    def spy(policy, quality, *args, **kw):
        seen.append(len(quality))
        return real(policy, quality, *args, **kw)

    monkeypatch.setattr(evaluate, "calibrate_fallback", spy)
    report = run_eval(EvalInputs(train, test, x, xt, "synthetic", None), ["knn"], cv=False, progress=False,
                      n_boot=20, folds=3)
    assert "knn+fallback" in report["routers"]
    assert seen and set(seen) == {len(train)}


def test_out_of_fold_scores_never_score_a_query_with_itself():
    from coe.routers.base import create_router
    from coe.routers.report import out_of_fold_scores

    train, x = clustered(40, 6)
    router = create_router("knn", {"k": 1}).fit(train, x)
    in_sample = router.score(__import__("coe.routers.base", fromlist=["QueryBatch"]).QueryBatch(train.queries, x))
    oof = out_of_fold_scores(router, train, x, folds=4)
    assert oof.quality.shape == (40, 4) and oof.uncertainty is not None
    assert np.array_equal(in_sample.quality, train.quality)          # k = 1 in sample: its own outcome
    assert not np.array_equal(oof.quality, train.quality)


def test_static_tune_corpus_holds_no_test_or_probe_text(tmp_path):
    import pathlib

    from coe.routers.static_tune import GSM8K_HELDOUT, collect_corpus

    repo = pathlib.Path(__file__).resolve().parents[2]
    args = json.loads((repo / "adapters" / "experts" / "math" / "training_args.json").read_text())
    assert GSM8K_HELDOUT == args["holdout"]           # the lines the math expert and bench/composition hold out
    (tmp_path / "routing").mkdir()
    (tmp_path / "training").mkdir()
    (tmp_path / "routing" / "routellm_gsm8k_responses.csv").write_text("prompt,gpt-4\ngsm8k test question,True\n")
    rows = [{"question": f"train question {i}", "answer": f"step {i}\n#### {i}"} for i in range(GSM8K_HELDOUT + 3)]
    (tmp_path / "training" / "gsm8k_train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "extra.txt").write_text(f"gsm8k test question\ntrain question {GSM8K_HELDOUT + 1}\nplain text\n")
    texts = set(collect_corpus(tmp_path))
    assert {"train question 0", "train question 2", "step 1", "plain text"} <= texts
    assert "gsm8k test question" not in texts                      # GSM8K test, even repeated in a .txt
    assert not any(f"train question {i}" in texts for i in range(3, GSM8K_HELDOUT + 3))
    assert "train question 3" not in texts and f"train question {GSM8K_HELDOUT + 1}" not in texts
    assert "step 5" not in texts                                   # a held-out solution line
