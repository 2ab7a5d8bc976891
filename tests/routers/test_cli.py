"""``coe eval`` and ``coe router fit`` on a small slice of the shared RouterBench data."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from coe.tools.cli import main


def _slice(src, dst, rows):
    csv.field_size_limit(sys.maxsize)
    with src.open(newline="") as f, dst.open("w", newline="") as g:
        reader, writer = csv.reader(f), csv.writer(g)
        for i, row in enumerate(reader):
            if i > rows:
                break
            writer.writerow(row)
    return dst


@pytest.fixture(scope="module")
def mbpp_slice(shared_data, minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mbpp")
    src = shared_data / "routing"
    return _slice(src / "mbpp_train.csv", root / "train.csv", 90), _slice(src / "mbpp_test.csv", root / "test.csv", 40)


def test_eval_writes_the_report(mbpp_slice, tmp_path, capsys):
    train, test = mbpp_slice
    args = ["eval", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "r"), "--quiet", "--folds", "3"]
    for name in ("knn", "learned", "best-single", "oracle", "random"):
        args += ["--router", name]
    assert main(args) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert {"zero_router_aiq", "best_single", "oracle", "routers"} <= set(report)
    assert set(report["best_single"]) == {"model", "quality", "cost"} and set(report["oracle"]) == {"quality", "cost"}
    for name, r in report["routers"].items():
        assert {"aiq", "apgr", "cpt50", "cpt80", "max_quality", "decisions_per_s"} <= set(r), name
        assert abs(sum(r["shares"].values()) - 1) < 1e-9
    routers = report["routers"]
    assert routers["oracle"]["aiq"] > report["zero_router_aiq"]
    assert routers["best-single"]["aiq"] <= report["zero_router_aiq"] + 1e-9
    assert routers["oracle"]["max_quality"] == pytest.approx(report["oracle"]["quality"])
    assert "cv" in routers["knn"] and routers["knn"]["cv"]["folds"] == 3
    assert (tmp_path / "r" / "cost_quality.png").stat().st_size > 10_000
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| knn |" in md and "zero router AIQ" in md
    assert "zero router AIQ" in capsys.readouterr().out


def test_eval_split_and_bad_input(mbpp_slice, tmp_path, capsys):
    train, _ = mbpp_slice
    assert main(["eval", "--train", str(train), "--split", "0.7", "--router", "best-single", "--out",
                 str(tmp_path / "s"), "--quiet", "--no-cv"]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["train"]["rows"] == 63 and report["test"]["rows"] == 27
    assert main(["eval", "--train", str(train), "--split", "0.7", "--router", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown router 'nope'; available: best-single" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("prompt,a,b\nq,1,0\n")
    assert main(["eval", "--train", str(train), "--test", str(other), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "only in test: a, b" in capsys.readouterr().err


def test_router_fit_saves_a_loadable_router(mbpp_slice, tmp_path, capsys):
    from coe.routers import load_router

    train, _ = mbpp_slice
    assert main(["router", "fit", "--data", str(train), "--out", str(tmp_path / "f"), "--router", "learned",
                 "--quiet", "--folds", "3", "--target-top-share", "0.2"]) == 0
    router, meta = load_router(tmp_path / "f")
    assert router.name == "learned" and len(router.experts) == 11
    from coe.config import load_config

    assert meta["cv"]["folds"] == 3 and meta["rows"] == 90 and meta["embedder"] == load_config().router.embedder
    assert meta["calibrated_policy"]["mode"] == "tradeoff" and meta["calibrated_policy"]["lam"] >= 0
    out = capsys.readouterr().out
    assert "saved to" in out and "router.policy: {mode: tradeoff, lam:" in out


def test_eval_selects_by_cv_and_reports_paired_cis(mbpp_slice, tmp_path, capsys):
    train, test = mbpp_slice
    args = ["eval", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "r"), "--quiet", "--folds", "3",
            "--bootstrap", "50"]
    for name in ("knn", "learned", "irt", "stacked", "oracle"):
        args += ["--router", name]
    assert main(args) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    routers = report["routers"]
    # the plain kNN baseline is always there, untuned
    assert report["baseline"] == {"name": "knn-plain", "router": "knn", "params": {"k": 20, "shrink": 0.0}}
    assert routers["knn-plain"]["params"]["k"] == 20 and routers["knn-plain"]["params"]["shrink"] == 0
    for name, r in routers.items():
        ci = r["ci"]["vs_zero"]
        assert ci["lo"] <= ci["diff"] <= ci["hi"] and ci["includes_zero"] == (ci["lo"] <= 0 <= ci["hi"]), name
        if name != "knn-plain":
            assert "vs_knn-plain" in r["ci"], name
        assert 0 <= r["calibration"]["brier"] <= 1
    # selection uses CV on train only; the oracle (reads outcomes) is never a candidate
    assert "cv" not in routers["oracle"]
    cv = {n: r["cv"]["cv_aiq"] for n, r in routers.items() if "cv" in r and n != "knn-plain"}
    if not report["stacked"]["beats_parts"]:
        cv.pop("stacked")
    assert report["selected_by_cv"] == max(cv, key=cv.get)
    sel = report["selected"]
    assert sel["name"] == report["selected_by_cv"] and sel["test_aiq"] == routers[sel["name"]]["aiq"]
    assert sel["meets_targets"] == (sel["vs_zero"]["diff"] >= 0.015 and sel["vs_zero"]["lo"] > 0
                                    and sel["vs_knn-plain"]["diff"] >= 0.01 and sel["vs_knn-plain"]["lo"] > 0)
    assert len(report["stacked"]["members"]) >= 2 and report["stacked"]["best_member"] in ("knn", "learned", "irt")
    # routers that report uncertainty are also evaluated with the fallback to the strong model
    assert {"irt+fallback", "knn+fallback", "learned+fallback"} <= set(routers)
    # power against the plain kNN: every other router, from its CI, at this test set's size
    power = report["power"]
    assert set(power) == set(routers) - {"knn-plain"}
    p = power[sel["name"]]
    assert p["rows"] == report["test"]["rows"] and p["target"] == 0.01
    assert p["halfwidth"] == pytest.approx((sel["vs_knn-plain"]["hi"] - sel["vs_knn-plain"]["lo"]) / 2)
    assert p["detectable"] == (p["mde_80"] <= 0.01)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Δ vs plain kNN [95% CI]" in md and "## Reliability of `irt`" in md and "selected router's test AIQ" in md
    assert "## Power against `knn-plain`" in md and f"| {sel['name']} | {p['halfwidth']:.4f} |" in md
    assert "selected by CV:" in capsys.readouterr().out


def test_eval_refuses_bad_bootstrap_and_fallback_share(mbpp_slice, tmp_path, capsys):
    train, test = mbpp_slice
    base = ["eval", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "x"), "--quiet",
            "--router", "best-single"]
    assert main([*base, "--bootstrap", "3"]) == 2
    assert "--bootstrap must be at least 10" in capsys.readouterr().err
    assert main([*base, "--fallback-share", "1.5"]) == 2
    assert "--fallback-share must be in [0, 1)" in capsys.readouterr().err


def test_eval_stacked_alone_uses_its_default_members(mbpp_slice, tmp_path):
    train, test = mbpp_slice
    assert main(["eval", "--train", str(train), "--test", str(test), "--out", str(tmp_path / "s"), "--quiet",
                 "--no-cv", "--bootstrap", "20", "--router", "stacked"]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["stacked"]["members"] == ["knn:k=50:shrink=8", "learned", "irt"]
    assert report["selected_by_cv"] is None and "selected" not in report   # no CV, no selection
    assert set(report["routers"]) == {"stacked", "knn-plain"}
