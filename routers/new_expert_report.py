"""``coe eval new-expert``'s report: ``report.json``, ``report.md`` and ``aiq_budget.png``.

``report.json``'s ``summary`` holds one record per strategy and budget with the keys
``strategy``, ``budget``, ``aiq``, ``top_quality``, ``recovered``, ``recovered_ci`` (``[low,
high]``), ``brier`` (and ``auc``, ``ability_se``, ``vs_random``); scripts read it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _f(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)


def _ci(c: dict | None) -> str:
    if not c:
        return "—"
    return f"{c['diff']:+.3f} [{_f(c['lo'], '+.3f')}, {_f(c['hi'], '+.3f')}]" + ("" if c["excludes_zero"] else " *")


def markdown(report: dict) -> str:
    st, ref = report["setup"], report["reference"]
    lines = [
        "# New-expert simulation: how many probes before a new expert is routed well",
        "",
        (f"- train (candidate probes): `{report['train']['source']}` ({report['train']['rows']} rows); test: "
         f"`{report['test']['source']}` ({report['test']['rows']} rows)"),
        f"- {len(report['models'])} models, each left out in turn; costs: {report['costs']}",
        (f"- router `{st['router']}` (params {st['params'] or 'defaults'}), unmeasured cells filled by "
         f"`{st['impute']}`, waves of {st['wave']}, random over {st['seeds']} seeds, {st['bootstrap']} paired-bootstrap "
         "replicates"),
        f"- {report['date']}; {report['machine']}" + (f"; embedder `{report['embedder']}`" if report.get("embedder") else ""),
        (f"- mean AIQ over held-out models: without the new expert **{ref['aiq_without']:.4f}**, with its full "
         f"profile **{ref['aiq_full']:.4f}** (zero router {ref['zero_router_aiq']:.4f}); models whose full profile "
         f"moves AIQ by ≥ {st['min_gain']}: {', '.join(f'`{m}`' for m in ref['counted_models']) or 'none'} "
         f"(gain sum {ref['gain_sum']:.4f})"),
        "",
        ("Recovered: Σ (AIQ_b − AIQ_without) / Σ (AIQ_full − AIQ_without) over the counted models, with its "
         "95% paired-bootstrap CI over test queries (and seeds for random). Δ vs random: the paired difference "
         "of recovered shares; `*` marks a CI that includes zero. Brier/AUC: the router's predicted quality of "
         "the new expert on each test query against its outcome (AUC only for 0/1 outcomes). Ability SE: the "
         "posterior SD of the new expert's 2PL ability after b probes (what a stop rule reads)."),
        "",
        "| strategy | budget | AIQ | top quality | recovered [95% CI] | Δ recovered vs random | Brier | AUC | ability SE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["summary"]:
        rec = "—" if r["recovered"] is None else (f"{r['recovered']:.3f} [{_f(r['recovered_ci'][0], '.3f')}, "
                                                  f"{_f(r['recovered_ci'][1], '.3f')}]")
        vs = (r.get("vs_random") or {}).get("recovered")
        lines.append(f"| {r['strategy']} | {r['budget']} | {r['aiq']:.4f} | {_f(r['top_quality'])} | {rec} | {_ci(vs)} | "
                     f"{_f(r['brier'])} | {_f(r.get('auc'), '.3f')} | {_f(r.get('ability_se'), '.3f')} |")
    lines += [(f"| full profile | {report['train']['rows']} | {ref['aiq_full']:.4f} | {ref['top_quality_full']:.4f} | "
               f"1 | — | {ref['brier_full']:.4f} | — | — |"), "",
              "## Per held-out model", "",
              "| model | AIQ without | AIQ full | gain | " + " | ".join(f"{s} @{b}" for s in st["strategies"]
                                                                   for b in _mid(st["budgets"])) + " |",
              "|---|---|---|---|" + "---|" * (len(st["strategies"]) * len(_mid(st["budgets"])))]
    for m, pm in report["per_model"].items():
        recs = [pm["recovered"].get(s, {}).get(str(b)) for s in st["strategies"] for b in _mid(st["budgets"])]
        lines.append(f"| {m} | {pm['aiq_without']:.4f} | {pm['aiq_full']:.4f} | {pm['gain']:+.4f}"
                     f"{'' if pm['counted'] else ' (not counted)'} | " + " | ".join(_f(v, '.2f') for v in recs) + " |")
    return "\n".join(lines) + "\n"


def _mid(budgets: list[int]) -> list[int]:
    """The budgets shown per model: 50 and its neighbours when present, else all."""
    keep = [b for b in budgets if b in (25, 50, 100)]
    return keep or list(budgets)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    ref = report["reference"]
    for strategy in report["setup"]["strategies"]:
        rows = [r for r in report["summary"] if r["strategy"] == strategy]
        b = [r["budget"] for r in rows]
        ax1.plot(b, [r["aiq"] for r in rows], marker="o", label=strategy)
        if rows and rows[0]["recovered"] is not None:
            rec = np.array([r["recovered"] for r in rows])
            lo = np.array([np.nan if r["recovered_ci"][0] is None else r["recovered_ci"][0] for r in rows])
            hi = np.array([np.nan if r["recovered_ci"][1] is None else r["recovered_ci"][1] for r in rows])
            ax2.plot(b, rec, marker="o", label=strategy)
            ax2.fill_between(b, lo, hi, alpha=0.15)
    ax1.axhline(ref["aiq_without"], color="grey", ls=":", label="without the new expert")
    ax1.axhline(ref["aiq_full"], color="black", ls="--", label="full profile")
    ax2.axhline(1.0, color="black", ls="--", lw=1)
    ax2.axhline(0.0, color="grey", ls=":", lw=1)
    for ax, title in ((ax1, "test AIQ (mean over held-out models)"), (ax2, "share of the full profile's gain recovered")):
        ax.set_xscale("log")
        ax.set_xlabel("probes measured on the new expert")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"new expert: {Path(report['test']['source']).name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_new_expert_report(report: dict, out: str | Path) -> Path:
    """Write ``report.json``, ``report.md`` and ``aiq_budget.png`` under ``out``; returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    write_plot(report, out / "aiq_budget.png")
    return out
