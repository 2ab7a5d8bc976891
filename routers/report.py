"""``coe eval``'s work: fit (with cross-validation on train), evaluate on test, write the report.

``DIR/report.json`` (machine-readable), ``DIR/report.md`` (a table a person reads) and
``DIR/cost_quality.png`` (every router's curve, the single models and the zero-router hull).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coe.errors import DatasetError
from coe.routers.base import FitContext, router_class
from coe.routers.evaluate import Reference, RouterResult, evaluate_router


@dataclass
class EvalInputs:
    train: object          # RoutingData
    test: object           # RoutingData
    train_emb: np.ndarray
    test_emb: np.ndarray
    embedder: str
    embed: object          # callable texts -> embeddings


def split_data(data, fraction: float, seed: int = 0):
    """Shuffle once (seeded) and cut into train (``fraction``) and test."""
    if not 0 < fraction < 1:
        raise DatasetError(f"--split must be between 0 and 1 (exclusive), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(data))
    cut = int(round(fraction * len(data)))
    if cut < 2 or len(data) - cut < 1:
        raise DatasetError(f"{data.source}: {len(data)} rows are too few to split at {fraction}")
    return data.subset(order[:cut]), data.subset(order[cut:])


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


BASELINE = "knn-plain"                       # RouterBench's plain kNN: always evaluated, never tuned
BASELINE_PARAMS = {"k": 20, "shrink": 0.0}
STACKABLE = ("knn", "learned", "irt", "centroid", "category", "skill")
TARGETS = {"vs_zero": 0.015, f"vs_{BASELINE}": 0.01}   # issue #15


def run_eval(inputs: EvalInputs, names: list[str], *, folds: int = 5, cv: bool = True, seed: int = 0,
             progress: bool = True, n_boot: int = 1000, fallback_share: float = 0.1, recruit: bool = False) -> dict:
    """Cross-validate on train, fit, evaluate on test, for each router; returns the report dict.

    Every router that does not read the true outcomes gets a CV AIQ on train (its grid searched);
    the one with the best CV AIQ is ``selected_by_cv`` (what a user would deploy; the test split
    plays no part). The plain kNN baseline (k=20, no shrinkage) is always added. ``stacked`` (when
    named) blends the best three stackable routers with their CV-chosen params and is eligible
    only when its CV AIQ beats each of theirs. Routers that report uncertainty are also evaluated
    with the uncertainty fallback to the best single training model: its threshold sends
    ``fallback_share`` of the *training* queries to it, scored out of fold
    (:func:`out_of_fold_scores`), so the test split plays no part. Paired-bootstrap 95% CIs of every
    router's test AIQ difference to the zero router and to the plain kNN come with each result.
    With ``recruit``, the recruit-and-vote policies of :mod:`coe.routers.recruit` over the selected
    router join ``routers`` (names ``recruit-*``), with ``report["recruit"]`` saying which one CV picks
    and its CI against that router.
    """
    from tqdm.auto import tqdm

    from coe.routers.builtin.stacked import member_spec
    from coe.routers.evaluate import Fallback, paired_bootstrap, power
    from coe.routers.tuning import cross_validate

    train, test = inputs.train, inputs.test
    ref = Reference.from_data(test)
    ctx = FitContext(seed=seed, embed=inputs.embed)
    results: dict[str, RouterResult] = {}
    cv_info: dict[str, dict] = {}
    fitted = {}

    def run(label: str, name: str, params: dict | None = None, grid: dict | None = None) -> None:
        cls = router_class(name)
        params = dict(params or {})
        if cv and not cls.needs_labels:
            grid = cls.cv_grid if grid is None else grid
            total = int(np.prod([len(v) for v in grid.values()])) if grid else 1
            with tqdm(total=total, desc=f"cv {label}", disable=not progress, file=sys.stderr) as bar:
                res = cross_validate(name, train, inputs.train_emb, grid=grid, base_params=params, folds=folds,
                                     seed=seed, ctx=ctx, progress=bar)
            params = res.params
            if res.folds:
                cv_info[label] = {"folds": res.folds, "cv_aiq": res.score, "fold_aiq": res.fold_scores,
                                  "grid": [{"params": p, "cv_aiq": s} for p, s in res.table]}
        router = cls(params).fit(train, inputs.train_emb, ctx)
        fitted[label] = router
        results[label] = evaluate_router(router, test, inputs.test_emb, ref, params=router.params.model_dump(),
                                         name=label)

    for name in names:
        if name != "stacked":
            run(name, name)
    run(BASELINE, "knn", BASELINE_PARAMS, grid={})
    stacked = None
    if "stacked" in names:
        parts = sorted((n for n in STACKABLE if n in cv_info), key=lambda n: -cv_info[n]["cv_aiq"])[:3]
        if len(parts) < 2:
            parts = [n for n in STACKABLE if n in results][:3]
        specs = [member_spec(n, {k: v for k, v in results[n].params.items() if k != "seed"}) for n in parts]
        run("stacked", "stacked", {"members": specs, "seed": seed} if specs else {"seed": seed}, grid={})
        specs = list(fitted["stacked"].params.members)
        best_part = max(parts, key=lambda n: cv_info.get(n, {}).get("cv_aiq", -np.inf)) if parts else None
        s_cv = cv_info.get("stacked", {}).get("cv_aiq")
        b_cv = cv_info.get(best_part, {}).get("cv_aiq") if best_part else None
        stacked = {"members": specs, "weights": fitted["stacked"].notes.get("weights"), "cv_aiq": s_cv,
                   "best_member": best_part, "best_member_cv_aiq": b_cv,
                   "beats_parts": bool(s_cv is not None and b_cv is not None and s_cv > b_cv)}
    strong = int(np.lexsort((train.mean_costs(), -train.quality.mean(axis=0)))[0])
    for label in [n for n in results if n != BASELINE]:
        router = fitted[label]
        if router.gives_uncertainty and fallback_share > 0:
            calib = out_of_fold_scores(router, train, inputs.train_emb, folds=folds, seed=seed, ctx=ctx)
            fb = Fallback(train.models[strong], fallback_share, calib)
            results[f"{label}+fallback"] = evaluate_router(router, test, inputs.test_emb, ref, name=f"{label}+fallback",
                                                           params={**router.params.model_dump(), "fallback": fb.expert,
                                                                   "fallback_share": fallback_share}, fallback=fb)
    eligible = {n: c["cv_aiq"] for n, c in cv_info.items()
                if n != BASELINE and np.isfinite(c["cv_aiq"]) and (n != "stacked" or (stacked or {}).get("beats_parts"))}
    selected = max(eligible, key=eligible.get) if eligible else None
    sweeps, recruited = {n: r.picks for n, r in results.items()}, None
    if recruit:
        from coe.routers.recruit import run_recruit

        if selected is None:
            raise DatasetError("--recruit recruits over the router cross-validation selects; give a router that "
                               "learns from outcomes, and enough training rows for the folds")
        recruited = run_recruit(inputs, selected, dict(results[selected].params), results[selected],
                                ref, folds=folds, seed=seed, ctx=ctx, cv=cv)
        results.update(recruited.results)
        sweeps.update(recruited.curves)
    cis = paired_bootstrap(sweeps, test, [BASELINE] + ([selected] if recruited else []), n_boot=n_boot, seed=seed)
    best = int(np.lexsort((ref.costs, -ref.qualities))[0])
    report = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "embedder": inputs.embedder,
        "train": {"source": train.source, "rows": len(train), "skipped": dict(train.skipped)},
        "test": {"source": test.source, "rows": len(test), "skipped": dict(test.skipped)},
        "models": ref.models,
        "single_models": {
            m: {"quality": float(q), "cost": float(c)} for m, q, c in zip(ref.models, ref.qualities, ref.costs)
        },
        "cost_range": [ref.c_min, ref.c_max],
        "zero_router_aiq": ref.zero_router_aiq,
        "best_single": {"model": ref.models[best], "quality": float(ref.qualities[best]), "cost": float(ref.costs[best])},
        "oracle": {"quality": ref.oracle_quality, "cost": ref.oracle_cost},
        "baseline": {"name": BASELINE, "router": "knn", "params": BASELINE_PARAMS},
        "bootstrap": {"replicates": n_boot, "seed": seed, "level": 0.95, "paired": True},
        "routers": {n: {**r.summary(), "ci": cis[n], **({"cv": cv_info[n]} if n in cv_info else {})}
                    for n, r in results.items()},
        "stacked": stacked,
        # what this test set's size can resolve against the plain kNN (issue #15's +0.01 target)
        "power": {n: power(c[f"vs_{BASELINE}"], len(test), TARGETS[f"vs_{BASELINE}"])
                  for n, c in cis.items() if f"vs_{BASELINE}" in c},
        # the router an honest user would deploy: best held-out AIQ in cross-validation on train
        "selected_by_cv": selected,
    }
    if selected is not None:
        ci = cis[selected]
        meets = all(ci[k]["diff"] >= t and ci[k]["lo"] > 0 for k, t in TARGETS.items() if k in ci)
        report["selected"] = {"name": selected, "test_aiq": results[selected].aiq, "cv_aiq": eligible[selected],
                              **{k: ci[k] for k in TARGETS if k in ci}, "targets": TARGETS, "meets_targets": meets}
    if recruited is not None:
        from coe.routers.recruit import finish

        report["recruit"] = finish(recruited.info, cis, results)
    return report


def out_of_fold_scores(router, train, embeddings: np.ndarray, *, folds: int = 5, seed: int = 0, ctx=None):
    """:class:`Scores` of every training query by ``router``'s class and params fitted on the other
    ``folds − 1`` folds (``coe.routers.tuning.kfold``): what a threshold on predicted scores (the
    uncertainty fallback) is calibrated on without the test split, and without the optimism of
    scoring the queries a router was fitted on. With fewer than ``2 × folds`` rows, the fitted
    ``router``'s own scores of the training queries."""
    from coe.routers.base import QueryBatch, Scores
    from coe.routers.tuning import kfold

    if folds < 2 or len(train) < 2 * folds:
        return router.score(QueryBatch(list(train.queries), embeddings))
    quality = np.zeros((len(train), len(router.experts)))
    unc = np.zeros_like(quality) if router.gives_uncertainty else None
    for held in kfold(len(train), folds, seed):
        rest = np.setdiff1d(np.arange(len(train)), held)
        part = type(router)(router.params).fit(train.subset(rest), embeddings[rest], ctx)
        s = part.score(QueryBatch([train.queries[i] for i in held], embeddings[held]))
        quality[held] = s.quality
        if unc is not None:
            unc[held] = s.uncertainty
    return Scores(experts=list(router.experts), quality=quality, cost=router.costs, uncertainty=unc)


def _fmt(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def _ci(c: dict | None) -> str:
    if not c:
        return "—"
    mark = " *" if c["includes_zero"] else ""
    return f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]{mark}"


def write_markdown(report: dict, path: Path) -> None:
    zero = report["zero_router_aiq"]
    bs, orc = report["best_single"], report["oracle"]
    base = report.get("baseline", {}).get("name", BASELINE)
    lines = [
        "# Router evaluation",
        "",
        f"- train: `{report['train']['source']}` ({report['train']['rows']} rows, skipped {report['train']['skipped'] or 0})",
        f"- test: `{report['test']['source']}` ({report['test']['rows']} rows, skipped {report['test']['skipped'] or 0})",
        f"- embedder: `{report['embedder']}`; {report['date']}; {report['machine']}",
        f"- best single model: **{bs['model']}** quality {bs['quality']:.4f} at cost {bs['cost']:.4g}",
        f"- oracle: quality {orc['quality']:.4f} at cost {orc['cost']:.4g}",
        f"- zero router AIQ: **{zero:.4f}**",
        f"- router selected by cross-validation on train (best held-out AIQ): **{report.get('selected_by_cv')}**",
    ]
    sel = report.get("selected")
    if sel:
        verdict = "meets" if sel["meets_targets"] else "does **not** meet"
        lines.append(
            f"- selected router's test AIQ {sel['test_aiq']:.4f}: vs zero {_ci(sel.get('vs_zero'))}, vs plain kNN "
            f"{_ci(sel.get(f'vs_{base}'))}; it {verdict} the targets (≥ +0.015 vs zero and ≥ +0.01 vs plain kNN, "
            "each 95% CI above 0)")
    st = report.get("stacked")
    if st:
        keep = "beats" if st["beats_parts"] else "does **not** beat"
        lines.append(f"- stacked ({', '.join(st['members'])}; weights {st['weights']}): CV AIQ {_fmt(st['cv_aiq'])} "
                     f"{keep} its best part {st['best_member']} ({_fmt(st['best_member_cv_aiq'])})")
    lines += [
        "",
        (f"Differences are paired-bootstrap estimates over the test queries "
         f"({report.get('bootstrap', {}).get('replicates', '?')} replicates): observed difference [95% CI]; "
         f"`*` marks a CI that includes zero. `{base}` is RouterBench's plain kNN (k = 20, no shrinkage). "
         "Brier: mean squared error of predicted quality vs outcome over all (query, expert) cells, on the 0..1 scale."),
        "",
        ("| router | AIQ | Δ vs zero [95% CI] | Δ vs plain kNN [95% CI] | CV AIQ (train) | Brier | APGR | CPT(50%) | "
         "max quality | decisions/s | params |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(report["routers"].items(), key=lambda kv: -kv[1]["aiq"]):
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if v not in (None, [], ""))
        cv_aiq = _fmt(r["cv"]["cv_aiq"]) if "cv" in r else "—"
        ci = r.get("ci", {})
        brier = _fmt((r.get("calibration") or {}).get("brier"))
        lines.append(
            f"| {name} | {r['aiq']:.4f} | {_ci(ci.get('vs_zero'))} | {_ci(ci.get(f'vs_{base}'))} | {cv_aiq} | {brier} | "
            f"{r['apgr']:.3f} | {_fmt(r['cpt50'], '.3f')} | {r['max_quality']:.4f} | {r['decisions_per_s']:.0f} | {params} |"
        )
    lines += [
        "",
        ("AIQ: area under the non-decreasing convex hull of (cost, quality) over the single models' cost "
         "range, divided by the range (RouterBench). APGR/CPT: RouteLLM's metrics with the cheapest model as "
         "weak and the best single model as strong; CPT is the normalised cost (0 = weak, 1 = strong) needed "
         "to recover 50% of the quality gap. decisions/s: the router's own work, batched, embeddings given. "
         "`+fallback`: the same router with the uncertainty fallback to the best single training model."),
    ]
    pw = report.get("power") or {}
    if pw:
        first = next(iter(pw.values()))
        lines += [
            "", f"## Power against `{base}` ({first['rows']} test queries)", "",
            (f"Half-width of the 95% CI of Δ vs `{base}`; MDE: the smallest true difference whose CI excludes "
             f"zero half the time (≈ the half-width) or 80% of the time (2.80 SE); rows: test queries for which "
             f"the 80% MDE would be {first['target']:+.2f} (SE ∝ 1/√n)."),
            "", "| router | half-width | SE | MDE (50%) | MDE (80%) | +{:.2f} detectable | rows for +{:.2f} |".format(
                first["target"], first["target"]),
            "|---|---|---|---|---|---|---|",
        ]
        verdict = {True: "yes", False: "no", None: "— (same picks)"}
        for name, p in sorted(pw.items(), key=lambda kv: -report["routers"][kv[0]]["aiq"]):
            lines.append(f"| {name} | {p['halfwidth']:.4f} | {p['se']:.4f} | {p['mde_50']:.4f} | {p['mde_80']:.4f} | "
                         f"{verdict[p['detectable']]} | {p['rows_for_target'] or '—'} |")
        orc = report["routers"].get("oracle", {}).get("ci", {}).get(f"vs_{base}")
        if orc:
            lines += ["", f"Headroom: the oracle beats `{base}` by {_ci(orc)} on this test set; no router can gain more."]
    for name in ("irt", sel["name"] if sel else None):
        r = report["routers"].get(name) if name else None
        if r and r.get("calibration") and name not in [ln.split("`")[1] for ln in lines if ln.startswith("## Reliability")]:
            lines += ["", f"## Reliability of `{name}` on test (predicted vs observed quality per bin)", "",
                      "| bin | predicted | observed | cells |", "|---|---|---|---|"]
            for b in r["calibration"]["reliability"]:
                lines.append(f"| {b['bin'][0]:.1f}–{b['bin'][1]:.1f} | {b['predicted']:.3f} | {b['observed']:.3f} | {b['count']} |")
    lines += [
        "",
        "## Share of test queries per expert at λ = 0 (max quality)",
        "",
        "| router | " + " | ".join(report["models"]) + " |",
        "|---|" + "---|" * len(report["models"]),
    ]
    for name, r in report["routers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['shares'].get(m, 0):.2f}" for m in report["models"]) + " |")
    if report.get("recruit"):
        from coe.routers.recruit import markdown_lines

        lines += markdown_lines(report)
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    singles = report["single_models"]
    cs = np.array([v["cost"] for v in singles.values()])
    qs = np.array([v["quality"] for v in singles.values()])
    ax.scatter(cs, qs, marker="s", color="black", zorder=3, label="single models")
    for m, c, q in zip(singles, cs, qs):
        ax.annotate(m.split("/")[-1], (c, q), fontsize=7, xytext=(3, 3), textcoords="offset points")
    from coe.routers.metrics import hull_value, nondecreasing_hull

    hull = nondecreasing_hull(cs, qs)
    lo, hi = report["cost_range"]
    hx = np.geomspace(lo, hi, 300)   # the hull is linear in cost: sample it densely for the log axis
    hy = hull_value(hull, hx)
    ax.plot(hx, hy, "k--", lw=1.5, label=f"zero router (AIQ {report['zero_router_aiq']:.3f})")
    for name, r in report["routers"].items():
        c = [p["cost"] for p in r["curve"]]
        q = [p["quality"] for p in r["curve"]]
        order = np.argsort(c)
        ax.plot(np.array(c)[order], np.array(q)[order], marker=".", lw=1, label=f"{name} (AIQ {r['aiq']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per query")
    ax.set_ylabel("mean quality")
    ax.set_title(f"cost vs quality: {Path(report['test']['source']).name}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out / "report.md")
    write_plot(report, out / "cost_quality.png")
    if report.get("recruit"):   # the recruit policies beside the single router they recruit over
        keep = {n: r for n, r in report["routers"].items() if n.startswith("recruit") or n == report["recruit"]["router"]}
        write_plot({**report, "routers": keep}, out / "recruit_cost_quality.png")
    return out
