"""``coe eval`` and ``coe router fit`` on a small slice of the shared RouterBench data."""

from __future__ import annotations

import csv
import json
import sys

import pytest

from coe.cli import main


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
    assert meta["cv"]["folds"] == 3 and meta["rows"] == 90 and meta["embedder"] == "minilm-l6"
    assert meta["calibrated_policy"]["mode"] == "tradeoff" and meta["calibrated_policy"]["lam"] >= 0
    out = capsys.readouterr().out
    assert "saved to" in out and "router.policy: {mode: tradeoff, lam:" in out
