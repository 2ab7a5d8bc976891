"""Each embedder with its own CV-selected router: what a deployment on that embedder would ship.

    flock /tmp/coe-heavy.lock .venv/bin/python -m bench.router_embedder_cv [ALIAS ...]

`bench/router_speed.py` holds the `learned` router's MiniLM CV params fixed so that only the
embedder changes; here each embedder gets its own 5-fold CV on ``*_train`` (``learned`` and
``knn`` over their grids), then the chosen params are fitted on train and scored on ``*_test``.
Deterministic (embeddings cached on disk), so it needs no quiet machine. Writes
``bench/results/router_embedder_cv.{json,md}``.
"""

from __future__ import annotations

import sys

from bench.record import RunRecord, write_results
from bench.router_speed import dev_split

DEFAULT = ["minilm-l6", "minilm-l6-int8", "minilm-l6-m2v", "minilm-l6-m2v-tuned", "minilm-l1-distil-int8"]
ROUTERS = ("learned", "knn")
SPLITS = ("winograde", "mbpp")


def run(aliases: list[str], ref: str = "minilm-l6") -> dict:
    """Per embedder, split and router: CV params and AIQ, test AIQ, and (for every embedder but
    ``ref``, when ``ref`` is among ``aliases``) the paired-bootstrap 95% CI of its test AIQ minus
    ``ref``'s (the same test queries resampled for both)."""
    from coe.routers import create_router
    from coe.routers.embedding import Embedder
    from coe.routers.evaluate import evaluate_router, paired_bootstrap
    from coe.routers.tuning import cross_validate

    out: dict = {}
    picks: dict = {}      # (split, router) -> {alias: [L, N] picks on the test split}
    tests: dict = {}
    for alias in aliases:
        emb = Embedder(alias, disk_cache=True, threads=2)
        for split in SPLITS:
            train, test, xtr, xte, ref_split = dev_split(emb, split)
            tests[split] = test
            for name in ROUTERS:
                cv = cross_validate(name, train, xtr)
                router = create_router(name, cv.params).fit(train, xtr)
                res = evaluate_router(router, test, xte, ref_split)
                picks.setdefault((split, name), {})[alias] = res.picks
                out.setdefault(alias, {}).setdefault(split, {})[name] = {
                    "params": cv.params, "cv_aiq": round(cv.score, 4), "test_aiq": round(res.aiq, 4)}
        emb.close()
    if ref in aliases:
        for (split, name), by_alias in picks.items():
            cis = paired_bootstrap(by_alias, tests[split], [ref])
            for alias, ci in cis.items():
                if f"vs_{ref}" in ci:
                    d = ci[f"vs_{ref}"]
                    out[alias][split][name]["vs_ref_ci"] = [round(d["lo"], 4), round(d["hi"], 4)]
    return out


def markdown(out: dict, ref: str = "minilm-l6") -> str:
    rows = []
    for alias, splits in out.items():
        cells = []
        for split in SPLITS:
            for name in ROUTERS:
                r = splits[split][name]
                d = r["test_aiq"] - out[ref][split][name]["test_aiq"] if ref in out else 0.0
                ci = f" [{r['vs_ref_ci'][0]:+.4f}, {r['vs_ref_ci'][1]:+.4f}]" if "vs_ref_ci" in r else ""
                cells.append(f"{r['test_aiq']:.4f} ({d:+.4f}{ci}; CV {r['cv_aiq']:.4f}, {r['params']})")
        rows.append(f"| `{alias}` | " + " | ".join(cells) + " |")
    head = " | ".join(f"{s} {n} test AIQ (Δ vs {ref} [95% CI]; CV, params)" for s in SPLITS for n in ROUTERS)
    return f"| embedder | {head} |\n|---|" + "---|" * (len(SPLITS) * len(ROUTERS)) + "\n" + "\n".join(rows) + "\n"


def main() -> int:
    aliases = sys.argv[1:] or DEFAULT
    rec = RunRecord.start(note="each embedder's own 5-fold CV on *_train; test AIQ on *_test (deterministic).")
    out = run(aliases)
    md = rec.markdown_header("Each embedder with its own CV-selected router") + markdown(out)
    write_results("router_embedder_cv", rec.finish({"results": out}), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
