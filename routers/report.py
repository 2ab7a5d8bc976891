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


def run_eval(inputs: EvalInputs, names: list[str], *, folds: int = 5, cv: bool = True, seed: int = 0,
             progress: bool = True) -> dict:
    """Cross-validate on train, fit, evaluate on test, for each router; returns the report dict."""
    from tqdm.auto import tqdm

    from coe.routers.tuning import cross_validate, grid_size

    ref = Reference.from_data(inputs.test)
    ctx = FitContext(seed=seed, embed=inputs.embed)
    results: dict[str, RouterResult] = {}
    cv_info: dict[str, dict] = {}
    for name in names:
        cls = router_class(name)
        total = grid_size(name) if cv else 1
        with tqdm(total=total, desc=f"cv {name}", disable=not progress or total <= 1, file=sys.stderr) as bar:
            if cv and total > 1:
                res = cross_validate(name, inputs.train, inputs.train_emb, folds=folds, seed=seed, ctx=ctx, progress=bar)
                params = res.params
                cv_info[name] = {"folds": res.folds, "cv_aiq": res.score, "grid": [
                    {"params": p, "cv_aiq": s} for p, s in res.table]}
            else:
                params = {}
        router = cls(params).fit(inputs.train, inputs.train_emb, ctx)
        results[name] = evaluate_router(router, inputs.test, inputs.test_emb, ref, params=router.params.model_dump())
    best = int(np.lexsort((ref.costs, -ref.qualities))[0])
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "embedder": inputs.embedder,
        "train": {"source": inputs.train.source, "rows": len(inputs.train), "skipped": dict(inputs.train.skipped)},
        "test": {"source": inputs.test.source, "rows": len(inputs.test), "skipped": dict(inputs.test.skipped)},
        "models": ref.models,
        "single_models": {
            m: {"quality": float(q), "cost": float(c)} for m, q, c in zip(ref.models, ref.qualities, ref.costs)
        },
        "cost_range": [ref.c_min, ref.c_max],
        "zero_router_aiq": ref.zero_router_aiq,
        "best_single": {"model": ref.models[best], "quality": float(ref.qualities[best]), "cost": float(ref.costs[best])},
        "oracle": {"quality": ref.oracle_quality, "cost": ref.oracle_cost},
        "routers": {n: {**r.summary(), **({"cv": cv_info[n]} if n in cv_info else {})} for n, r in results.items()},
        # the router an honest user would deploy: best held-out AIQ in cross-validation on train
        "selected_by_cv": max(cv_info, key=lambda n: cv_info[n]["cv_aiq"]) if cv_info else None,
    }


def _fmt(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def write_markdown(report: dict, path: Path) -> None:
    zero = report["zero_router_aiq"]
    bs, orc = report["best_single"], report["oracle"]
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
        "",
        "| router | AIQ | AIQ − zero | CV AIQ (train) | APGR | CPT(50%) | CPT(80%) | max quality | decisions/s | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(report["routers"].items(), key=lambda kv: -kv[1]["aiq"]):
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if v not in (None, [], ""))
        cv_aiq = _fmt(r["cv"]["cv_aiq"]) if "cv" in r else "—"
        lines.append(
            f"| {name} | {r['aiq']:.4f} | {r['aiq'] - zero:+.4f} | {cv_aiq} | {r['apgr']:.3f} | {_fmt(r['cpt50'], '.3f')} | "
            f"{_fmt(r['cpt80'], '.3f')} | {r['max_quality']:.4f} | {r['decisions_per_s']:.0f} | {params} |"
        )
    lines += [
        "",
        "AIQ: area under the non-decreasing convex hull of (cost, quality) over the single models' cost "
        "range, divided by the range (RouterBench). APGR/CPT: RouteLLM's metrics with the cheapest model as "
        "weak and the best single model as strong; CPT is the normalised cost (0 = weak, 1 = strong) needed "
        "to recover 50%/80% of the quality gap. decisions/s: the router's own work, batched, embeddings given.",
        "",
        "## Share of test queries per expert at λ = 0 (max quality)",
        "",
        "| router | " + " | ".join(report["models"]) + " |",
        "|---|" + "---|" * len(report["models"]),
    ]
    for name, r in report["routers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['shares'].get(m, 0):.2f}" for m in report["models"]) + " |")
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
    return out
