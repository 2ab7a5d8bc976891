"""How many probes does a new expert need before it is routed well? ``coe eval new-expert`` on every dev set.

Dev sets (``../shared/data/routing``): RouterBench's winogrande and mbpp splits (11 models, USD
costs) and RouterDC's seven open 7–8B models (``rdc7/``, ``scores`` format, no costs: every
model costs 1, so AIQ is the top quality): ``arc_easy``, ``cmmlu``, ``humaneval`` with their
train/test files; ``MATH_prealgebra``, ``ceval``, ``mbpp``, ``javascript`` split 50/50 by a
seeded shuffle of queries (``coe.routers.report.split_data``, seed 0). Each set's report goes to
``bench/results/new_expert/<set>/report.{json,md,png}``; the summary to
``bench/results/new_expert.{json,md}``.

Targets (issue 23): on every set with at least 5 models, at b = 50, ``adaptive`` recovers at
least 90% of the full profile's AIQ gain; and beats ``random`` with a paired CI above zero on at
least two sets.

    nice -n 10 python bench/new_expert.py [--sets winograde,rdc7_cmmlu] [--seeds 5] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/new_expert.py` from the checkout
    sys.path.insert(0, str(REPO))

from bench.record import RunRecord, write_results

DATA = REPO.parent / "shared" / "data" / "routing"
OUT = REPO / "bench" / "results" / "new_expert"
PAIRED = ("arc_easy", "cmmlu", "humaneval")
SINGLE = ("MATH_prealgebra", "ceval", "mbpp", "javascript")


def dev_sets() -> dict[str, tuple[Path, Path | None]]:
    """``{name: (train file, test file or None to split)}``."""
    sets: dict[str, tuple[Path, Path | None]] = {
        "winograde": (DATA / "winograde_train.csv", DATA / "winograde_test.csv"),
        "mbpp": (DATA / "mbpp_train.csv", DATA / "mbpp_test.csv"),
    }
    sets.update({f"rdc7_{n}": (DATA / "rdc7" / f"{n}_train.json", DATA / "rdc7" / f"{n}_test.json") for n in PAIRED})
    sets.update({f"rdc7_{n}": (DATA / "rdc7" / f"{n}.json", None) for n in SINGLE})
    return sets


def load_set(train_path: Path, test_path: Path | None):
    from coe.routers.datasets import load_routing_data
    from coe.routers.report import split_data

    train = load_routing_data(train_path)
    if test_path is None:
        skipped = train.skipped
        train, test = split_data(train, 0.5, seed=0)
        train.skipped = test.skipped = skipped
        return train, test
    return train, load_routing_data(test_path).reordered(train.models)


def run_set(name: str, paths, embedder, args) -> dict:
    from coe.routers.base import FitContext
    from coe.routers.datasets import embed_routing_data
    from coe.routers.new_expert import NewExpertSetup, simulate
    from coe.routers.new_expert_report import write_new_expert_report
    from coe.routers.tuning import cross_validate

    t0 = time.monotonic()
    train, test = load_set(*paths)
    xtr, xte, _ = embed_routing_data(embedder, train, test)
    ctx = FitContext(seed=0, embed=embedder.encode)
    params = cross_validate(args.router, train, xtr, seed=0, ctx=ctx).params if args.cv else {}
    setup = NewExpertSetup(strategies=args.strategies.split(","), budgets=[int(b) for b in args.budgets.split(",")],
                           seeds=args.seeds, router=args.router, params=params, impute=args.impute, wave=args.wave,
                           n_boot=args.bootstrap)
    report = simulate(train, test, xtr, xte, setup, ctx=ctx,
                      progress=lambda m: print(f"  {name}: leaving out {m}", flush=True))
    report["embedder"] = args.embedder
    report["wall_s"] = round(time.monotonic() - t0, 1)
    write_new_expert_report(report, OUT / name)
    return report


def _rec(r: dict | None) -> str:
    if r is None or r["recovered"] is None:
        return "—"
    lo, hi = r["recovered_ci"]
    return f"{r['recovered']:.2f} [{lo:.2f}, {hi:.2f}]" if lo is not None else f"{r['recovered']:.2f}"


def _diff(r: dict | None) -> str:
    c = ((r or {}).get("vs_random") or {}).get("recovered")
    if not c or c["lo"] is None:
        return "—"
    return f"{c['diff']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]" + ("" if c["excludes_zero"] else " *")


def summarise(reports: dict[str, dict], strategies: list[str]) -> tuple[dict, str]:
    def row(rep: dict, strategy: str, b: int) -> dict | None:
        return next((r for r in rep["summary"] if r["strategy"] == strategy and r["budget"] == b), None)

    sets, lines = {}, [
        "| set | models | train / test | counted models (gain sum) | AIQ without → full | "
        + " | ".join(f"{s} @{b}" for s in strategies for b in (25, 50, 100))
        + " | adaptive − random @50 (recovered) | adaptive − random @50 (AIQ) |",
        "|---|---|---|---|---|" + "---|" * (3 * len(strategies)) + "---|---|",
    ]
    for name, rep in reports.items():
        ref = rep["reference"]
        ad50 = row(rep, "adaptive", 50)
        aiq_diff = ((ad50 or {}).get("vs_random") or {}).get("aiq")
        sets[name] = {
            "models": len(rep["models"]), "counted": len(ref["counted_models"]), "gain_sum": ref["gain_sum"],
            "aiq_without": ref["aiq_without"], "aiq_full": ref["aiq_full"],
            "recovered": {s: {b: (row(rep, s, b) or {}).get("recovered") for b in (25, 50, 100)} for s in strategies},
            "recovered_ci": {s: {b: (row(rep, s, b) or {}).get("recovered_ci") for b in (25, 50, 100)} for s in strategies},
            "adaptive_vs_random_50": (ad50 or {}).get("vs_random"),
            "adaptive_recovers_90_at_50": None if ad50 is None or ad50["recovered"] is None else ad50["recovered"] >= 0.9,
            "adaptive_beats_random_at_50": bool(aiq_diff and aiq_diff["lo"] is not None and aiq_diff["lo"] > 0),
        }
        aiq_txt = "—" if not aiq_diff or aiq_diff["lo"] is None else (
            f"{aiq_diff['diff']:+.4f} [{aiq_diff['lo']:+.4f}, {aiq_diff['hi']:+.4f}]")
        lines.append(f"| {name} | {len(rep['models'])} | {rep['train']['rows']} / {rep['test']['rows']} | "
                     f"{len(ref['counted_models'])} ({ref['gain_sum']:.4f}) | {ref['aiq_without']:.4f} → {ref['aiq_full']:.4f} | "
                     + " | ".join(_rec(row(rep, s, b)) for s in strategies for b in (25, 50, 100))
                     + f" | {_diff(ad50)} | {aiq_txt} |")
    eligible = [n for n, s in sets.items() if s["models"] >= 5]
    t1 = {n: sets[n]["adaptive_recovers_90_at_50"] for n in eligible}
    beats = [n for n in eligible if sets[n]["adaptive_beats_random_at_50"]]
    targets = {"adaptive_recovers_90_at_50": t1, "all_sets_recover_90": all(v is True for v in t1.values()),
               "sets_where_adaptive_beats_random_at_50": beats, "beats_random_on_two_sets": len(beats) >= 2}
    return {"sets": sets, "targets": targets}, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", help="comma-separated set names (default: all)")
    p.add_argument("--strategies", default="adaptive,information,round_robin,random")
    p.add_argument("--budgets", default="10,25,50,100,200")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--router", default="knn")
    p.add_argument("--impute", default="knn", choices=["knn", "irt"])
    p.add_argument("--wave", type=int, default=5)
    p.add_argument("--no-cv", dest="cv", action="store_false", help="the router's default params (no CV on train)")
    p.add_argument("--embedder", default="minilm-l6")
    p.add_argument("--name", default="new_expert", help="results name: bench/results/<name>.{json,md}")
    p.add_argument("--from-reports", action="store_true",
                   help="run nothing: summarise the per-set reports already under bench/results/new_expert/")
    args = p.parse_args(argv)
    if args.from_reports:
        return summarise_saved(args)
    rec = RunRecord.start(note=f"router {args.router} (params by {'5-fold CV on train' if args.cv else 'default'}), "
                               f"fill `{args.impute}`, {args.seeds} random seeds, {args.bootstrap} bootstrap replicates.")
    from coe.routers.embedding import Embedder

    embedder = Embedder(args.embedder, disk_cache=True)
    all_sets = dev_sets()
    names = args.sets.split(",") if args.sets else list(all_sets)
    reports = {}
    for name in names:
        reports[name] = run_set(name, all_sets[name], embedder, args)
        print(f"{name}: done in {reports[name]['wall_s']:.0f} s", flush=True)
        write_summary(rec, args, reports, done=len(reports) == len(names))
    return 0


def write_summary(rec: RunRecord, args, reports: dict, *, done: bool) -> None:
    """The summary of the sets run so far (rewritten after each set, so a cut run leaves its part)."""
    strategies = args.strategies.split(",")
    data, table = summarise(reports, strategies)
    t = data["targets"]
    met = {True: "met", False: "not met"}
    t90 = ", ".join(f"{n}: {v}" for n, v in t["adaptive_recovers_90_at_50"].items())
    beats = ", ".join(t["sets_where_adaptive_beats_random_at_50"]) or "none"
    body = [
        ("What share of the AIQ gain of a new expert's full profile comes back when it is profiled on only b train "
         "probes (`coe eval new-expert`, each model left out in turn; ratio of sums over the models whose full "
         "profile moves test AIQ by ≥ 0.002; 95% paired-bootstrap CIs over test queries, and over seeds for random). "
         "Per-set reports: `bench/results/new_expert/<set>/report.md`. rdc7 sets carry no costs: every model costs "
         "1, so their AIQ is the top quality. Dev sets only: the router's params and every choice below were made "
         "on these sets, so the figures are in-distribution."),
        "",
        table,
        "",
        ("`*`: the CI includes zero. A set whose counted models gain little (gain sum near 0.002 × models) has a "
         "noisy ratio: read its CI, not its point."),
        "",
        "## Targets",
        "",
        (f"- adaptive recovers ≥ 90% at b = 50 on every set with ≥ 5 models: "
         f"**{met[t['all_sets_recover_90']]}** ({t90})"),
        (f"- adaptive beats random at b = 50 with a paired CI (AIQ) above zero on ≥ 2 sets: "
         f"**{met[t['beats_random_on_two_sets']]}** (sets: {beats})"),
    ]
    if not done:
        body.insert(0, f"**Partial: {len(reports)} set(s) so far ({', '.join(reports)}).**\n")
    result = rec.finish({"settings": vars(args), **data})
    write_results(args.name, result, rec.markdown_header("New expert: probes needed before it is routed well")
                  + "\n".join(body))
    if done:
        print("\n".join(body))



def summarise_saved(args) -> int:
    """The summary from the per-set ``report.json`` files (a run split over processes, or a re-read)."""
    import json

    rec = RunRecord.start(note="Summary of the per-set reports below (each records its own date, machine and "
                               "settings).")
    reports = {d.name: json.loads((d / "report.json").read_text()) for d in sorted(OUT.iterdir())
               if (d / "report.json").is_file()}
    order = list(dev_sets())
    reports = {n: reports[n] for n in sorted(reports, key=lambda n: order.index(n) if n in order else len(order))}
    first = next(iter(reports.values()))["setup"]
    args.strategies = ",".join(first["strategies"])
    write_summary(rec, args, reports, done=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
