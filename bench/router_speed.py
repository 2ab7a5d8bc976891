"""Routing speed and quality per embedder: decisions/s, one-query p50/p99, AIQ, all caches off.

A *decision* is the whole routing step the service runs for a query: embedding (every cache
off, so every query goes through the model) + the router's scores + the shared policy, through
the service's ``OnlineRouter`` (the centroid over the default config's experts: a fitted router
belongs to the embedder it was fitted with). For each embedder (interleaved repeats,
so drifting load hits every candidate alike) it measures:

- batched decisions/s (batches of ``--batch`` distinct short queries);
- one query at a time: p50 / p99 latency;
- ``--clients`` concurrent clients through the ingress's micro-batcher (in process, no HTTP):
  p50 / p99 per-query latency and decisions/s;
- AIQ on the winogrande and mbpp dev splits (fit on ``*_train``, evaluate on ``*_test``) of the
  ``learned`` router (what cross-validation selects on both sets with MiniLM; its CV params are
  held fixed so that only the embedder changes), the plain kNN (k=20) and the centroid.

Targets (issue #12): ≤ 5 ms p50 for one short query, ≥ 500 decisions/s batched, AIQ within
0.005 of MiniLM in PyTorch (``minilm-l6``) or better. Run it quiet and under the heavy lock:

    flock /tmp/coe-heavy.lock ../shared/tools/quiet-run -- .venv/bin/python bench/router_speed.py

Writes ``router_speed.json`` and ``router_speed.md`` (``--tag`` adds a suffix) with the machine,
date, load before/after and the exact command.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing"
EMBEDDERS = ["minilm-l6", "minilm-l6-bf16", "minilm-l6-onnx", "minilm-l6-int8", "minilm-l6-m2v"]
# CV-selected with MiniLM (bench/results/router_eval_*/report.json), held fixed across embedders.
LEARNED = {"winograde": {"l2": 10.0, "shrink": 0.75}, "mbpp": {"l2": 10.0, "shrink": 0.5}}
ROUTERS = {"learned": None, "knn": {"k": 20, "shrink": 0.0}, "centroid": {"calibrate": True}}


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs), q))


def dev_split(emb, split: str):
    """``(train, test, train embeddings, test embeddings, Reference)`` of a dev split."""
    from coe.routers.datasets import load_routing_data, routing_texts, shared_prefix
    from coe.routers.evaluate import Reference

    train = load_routing_data(DATA / f"{split}_train.csv")
    test = load_routing_data(DATA / f"{split}_test.csv").reordered(train.models)
    prefix = shared_prefix(train.queries)
    xtr = emb.encode(routing_texts(train.queries, prefix))
    xte = emb.encode(routing_texts(test.queries, prefix))
    return train, test, xtr, xte, Reference.from_data(test)


def quality(alias: str, threads: int) -> dict:
    """AIQ per dev split and router for one embedder (embeddings cached on disk: quality only)."""
    from coe.routers import create_router
    from coe.routers.embedding import Embedder
    from coe.routers.evaluate import evaluate_router

    emb = Embedder(alias, disk_cache=True, threads=threads)
    out = {}
    for split in ("winograde", "mbpp"):
        train, test, xtr, xte, ref = dev_split(emb, split)
        row = {"zero_router": ref.zero_router_aiq}
        for name, params in ROUTERS.items():
            router = create_router(name, params if params is not None else LEARNED[split]).fit(train, xtr)
            row[name] = evaluate_router(router, test, xte, ref).aiq
        out[split] = row
    emb.close()
    return out


def speed_once(online, batcher_cls, batched: list[str], singles: list[str], args) -> dict:
    """One repeat of the speed measurements for one embedder's OnlineRouter."""
    t = time.perf_counter()
    for i in range(0, len(batched), args.batch):
        online.route(batched[i : i + args.batch])
    dps = len(batched) / (time.perf_counter() - t)
    lat = []
    for q in singles:
        t = time.perf_counter()
        online.route([q])
        lat.append(time.perf_counter() - t)

    async def clients() -> tuple[list[float], float]:
        batcher = batcher_cls(online.route, max_batch=args.batch, max_wait_ms=args.wait_ms)
        per = len(batched) // args.clients
        waits: list[float] = []

        async def client(c: int) -> None:
            for q in batched[c * per : (c + 1) * per]:
                t0 = time.perf_counter()
                await batcher.route(q)
                waits.append(time.perf_counter() - t0)

        await batcher.route("warm up the worker thread")
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(args.clients)))
        return waits, len(waits) / (time.perf_counter() - t0)

    waits, cdps = asyncio.run(clients())
    return {"batched_dps": dps, "single_p50_ms": 1e3 * statistics.median(lat), "single_p99_ms": 1e3 * pct(lat, 99),
            "clients_p50_ms": 1e3 * statistics.median(waits), "clients_p99_ms": 1e3 * pct(waits, 99),
            "clients_dps": cdps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embedders", default=",".join(EMBEDDERS), help="comma-separated embedder aliases or folders")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every backend (2 = this machine)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--singles", type=int, default=100)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=1.0, help="micro-batcher wait (router.batch_wait_ms)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-quality", action="store_true", help="skip the AIQ part")
    ap.add_argument("--no-speed", action="store_true", help="only the AIQ part (deterministic: no quiet machine needed)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    load_before = os.getloadavg()
    started = dt.datetime.now(dt.UTC)

    import torch

    torch.set_num_threads(args.threads)
    from coe.config import load_config
    from coe.routers import build_online_router
    from coe.routers.datasets import load_routing_data
    from coe.routers.embedding import Embedder
    from coe.routers.microbatch import MicroBatcher

    names = [e for e in args.embedders.split(",") if e]
    quality_rows = {} if args.no_quality else {n: quality(n, args.threads) for n in names}

    # short queries (MBPP task statements, ~80 characters); caches are off, so repeats are fresh
    short = [q for q in load_routing_data(DATA / "mbpp_test.csv").queries + load_routing_data(DATA / "mbpp_train.csv").queries]
    batched = short[: args.batch * 4]
    singles = short[args.batch * 4 : args.batch * 4 + args.singles]
    cfg = load_config()
    # The description (centroid) router over the default experts: a fitted router only fits the
    # embedding space it was fitted in, so it cannot be compared across embedders.
    rcfg = cfg.router.model_copy(update={"name": "centroid", "fitted": None, "params": {}})
    routers = {}
    for n in [] if args.no_speed else names:
        emb = Embedder(n, memory_items=0, threads=args.threads)      # no memory cache, no disk cache
        routers[n] = build_online_router(rcfg, cfg.experts, embedder=emb)
        routers[n].route(["warm up the model"] * 8)
        routers[n].route(["warm up"])
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(0 if args.no_speed else args.repeats):
        for n in names:   # interleaved: each repeat visits every embedder once
            runs[n].append(speed_once(routers[n], MicroBatcher, batched, singles, args))

    def agg(n: str, key: str) -> dict:
        xs = [r[key] for r in runs[n]]
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}

    table = {}
    for n in names:
        emb = routers[n].embedder if n in routers else Embedder(n)
        table[n] = {"backend": emb.backend, "dim": emb.dim,
                    **({k: agg(n, k) for k in runs[n][0]} if runs[n] else {}), "quality": quality_rows.get(n),
                    "runs": runs[n]}
    result = {
        "date": started.isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
                   f"threads {args.threads}",
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "decision": "OnlineRouter, centroid over the default config's experts' descriptions, every cache off",
        "queries": {"batched": len(batched), "batch": args.batch, "singles": len(singles), "clients": args.clients,
                    "wait_ms": args.wait_ms, "repeats": args.repeats},
        "aiq_routers": {"learned": LEARNED, **{k: v for k, v in ROUTERS.items() if v is not None}},
        "targets": {"single_p50_ms": 5, "batched_dps": 500, "aiq_within": 0.005},
        "embedders": table,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "router_speed" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = render(result, names)
    (out / f"{stem}.md").write_text(md)
    print(md)


def render(result: dict, names: list[str]) -> str:
    t = result["embedders"]
    base = t.get("minilm-l6", {}).get("quality")
    lines = [
        "# Routing speed and quality per embedder",
        "",
        f"{result['date']}; {result['machine']}; load before {result['load_before']}, after {result['load_after']}",
        "",
        f"Command: `{result['command']}`",
        "",
        (f"A decision: {result['decision']}. Median of {result['queries']['repeats']} interleaved repeats "
         "(min–max in brackets)."),
        "",
        ("| embedder | backend | dim | decisions/s batched | one query p50 ms | p99 ms | "
         f"{result['queries']['clients']} clients p50 ms | p99 ms | decisions/s | "
         "AIQ winogrande (learned / kNN / centroid) | AIQ mbpp (learned / kNN / centroid) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(cell: dict | None, digits: int) -> str:
        if cell is None:
            return "—"
        return f"{cell['median']:.{digits}f} [{cell['min']:.{digits}f}–{cell['max']:.{digits}f}]"

    def aiq(q: dict | None, split: str) -> str:
        if not q:
            return "—"
        parts = []
        for r in ("learned", "knn", "centroid"):
            v = q[split][r]
            d = f" ({v - base[split][r]:+.4f})" if base and r == "learned" else ""
            parts.append(f"{v:.4f}{d}")
        return " / ".join(parts)

    for n in names:
        r = t[n]
        lines.append(
            f"| {n} | {r['backend']} | {r['dim']} | {f(r.get('batched_dps'), 0)} | {f(r.get('single_p50_ms'), 2)} | "
            f"{f(r.get('single_p99_ms'), 2)} | {f(r.get('clients_p50_ms'), 2)} | {f(r.get('clients_p99_ms'), 2)} | "
            f"{f(r.get('clients_dps'), 0)} | {aiq(r['quality'], 'winograde')} | {aiq(r['quality'], 'mbpp')} |"
        )
    if base:
        lines += ["", (f"Zero router AIQ: winogrande {base['winograde']['zero_router']:.4f}, "
                       f"mbpp {base['mbpp']['zero_router']:.4f}. The learned router's difference to MiniLM in "
                       "PyTorch (minilm-l6) is in brackets; the quality target is ≥ −0.005.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
