"""Routing speed on this machine: batched decisions/s, one-query p50 latency, router's own share.

A *decision* is the whole routing step for a query: MiniLM embedding (fresh: caches off) +
the router's scores + the shared policy. Measured for the ``learned`` router over the 11
RouterBench models (fitted on winograde_train) and for the service's ``OnlineRouter`` on the
default config (centroid over 4 experts). Targets (issue 3): ≥ 200 decisions/s batched, ≤ 15 ms
p50 for one short query, router's own work ≤ 10% of the total.

    .venv/bin/python bench/router_speed.py [--threads 2] [--out bench/results]

Writes ``router_speed_t<threads>.json`` and ``.md``. On a machine shared with other jobs, one
torch thread is often faster than two (spinning OpenMP threads lose their cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing"


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target is stated for 2 cores)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--singles", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from coe.config import load_config
    from coe.routers import SelectionPolicy, build_online_router, create_router
    from coe.routers.base import QueryBatch
    from coe.routers.datasets import load_routing_data, routing_texts, shared_prefix
    from coe.routers.embedding import Embedder

    train = load_routing_data(DATA / "winograde_train.csv")
    prefix = shared_prefix(train.queries)
    cached = Embedder("minilm-l6", disk_cache=True)
    router = create_router("learned").fit(train, cached.encode(routing_texts(train.queries, prefix)))
    policy = SelectionPolicy("tradeoff", lam=10.0 / float(router.costs.max()))

    # short queries the embedder has never seen: MBPP task statements (~80 characters)
    short = load_routing_data(DATA / "mbpp_test.csv").queries + load_routing_data(DATA / "mbpp_train.csv").queries
    batched = short[: args.batch * 4]
    singles = short[args.batch * 4 : args.batch * 4 + args.singles]

    fresh = Embedder("minilm-l6", memory_items=0)   # no caches: every query is embedded
    fresh.encode(["warm up the model"] * 8)

    def decide(texts):
        emb, t_emb = timed(fresh.encode, texts)
        t = time.perf_counter()
        s = router.score(QueryBatch(texts, emb))
        policy.select(s.quality, s.cost)
        return t_emb, time.perf_counter() - t

    # batched
    t_emb = t_rt = 0.0
    start = time.perf_counter()
    for i in range(0, len(batched), args.batch):
        e, r = decide(batched[i : i + args.batch])
        t_emb, t_rt = t_emb + e, t_rt + r
    wall = time.perf_counter() - start
    batch_res = {
        "queries": len(batched), "batch": args.batch, "decisions_per_s": len(batched) / wall,
        "embedding_s": t_emb, "router_s": t_rt, "router_share": t_rt / (t_emb + t_rt),
    }
    # one query at a time
    lat, emb_s, rt_s = [], [], []
    for q in singles:
        t = time.perf_counter()
        e, r = decide([q])
        lat.append(time.perf_counter() - t)
        emb_s.append(e)
        rt_s.append(r)
    single_res = {
        "queries": len(singles), "p50_ms": 1e3 * statistics.median(lat),
        "p90_ms": 1e3 * float(np.percentile(lat, 90)), "router_p50_ms": 1e3 * statistics.median(rt_s),
        "router_share": sum(rt_s) / (sum(rt_s) + sum(emb_s)),
    }
    # the service's OnlineRouter on the default config (centroid), fresh embedder
    cfg = load_config()
    online = build_online_router(cfg.router, cfg.experts, embedder=fresh)
    online_lat = []
    for q in singles:
        _, t = timed(online.route, [q + " (online)"])
        online_lat.append(t)
    _, t_ob = timed(online.route, [q + " (online batch)" for q in batched])
    online_res = {
        "p50_ms": 1e3 * statistics.median(online_lat),
        "decisions_per_s": len(batched) / t_ob,
    }

    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                   f"(load average {os.getloadavg()[0]:.1f} at the end), torch threads {args.threads}",
        "router": "learned (11 RouterBench experts)",
        "batched": batch_res,
        "single": single_res,
        "online_centroid_default_config": online_res,
        "targets": {"decisions_per_s": 200, "p50_ms": 15, "router_share": 0.10},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"router_speed_t{args.threads}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Router speed",
        "",
        f"{result['date']}; {result['machine']}",
        "",
        "| measure | value | target | ratio to target |",
        "|---|---|---|---|",
        f"| batched decisions/s (batch {args.batch}, embedding included) | {batch_res['decisions_per_s']:.0f} | ≥ 200 | "
        f"{batch_res['decisions_per_s'] / 200:.2f}x |",
        f"| one short query p50 (embedding included) | {single_res['p50_ms']:.1f} ms | ≤ 15 ms | "
        f"{15 / single_res['p50_ms']:.2f}x |",
        f"| router's own share, batched | {100 * batch_res['router_share']:.2f}% | ≤ 10% | "
        f"{0.10 / max(batch_res['router_share'], 1e-9):.0f}x |",
        f"| router's own share, one query | {100 * single_res['router_share']:.2f}% | ≤ 10% | "
        f"{0.10 / max(single_res['router_share'], 1e-9):.0f}x |",
        f"| OnlineRouter (centroid, default config) one query p50 | {online_res['p50_ms']:.1f} ms | ≤ 15 ms | "
        f"{15 / online_res['p50_ms']:.2f}x |",
        f"| OnlineRouter batched decisions/s | {online_res['decisions_per_s']:.0f} | ≥ 200 | "
        f"{online_res['decisions_per_s'] / 200:.2f}x |",
    ]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
