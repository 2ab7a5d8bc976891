"""The routing the service adds at 32 concurrent clients (issue #12: target ≤ 5 ms p50, embedding
included, fresh queries).

    python -m bench.serve_routing [--clients 32] [--requests 200] [--phase-s 30] [--rounds 2]
                                  [--embedders minilm-l6-int8,minilm-l6-m2v] [--max-tokens 8]

For each embedder, starts ``coe serve`` (:class:`bench.soak.Service`) on the default config; for
an embedder other than the default's, on a copy with ``router.embedder`` set and the shipped kNN
refitted on the shipped profiles with that embedder and the shipped params (a fitted router only
fits its own embedding space). Then ``--rounds`` rounds, each of up to two phases of ``--clients``
closed-loop clients (:class:`bench.soak.Recorder`), at most ``--requests`` requests or
``--phase-s`` seconds each:

- routed: ``model: "coe"``; every prompt is unique (a short MBPP task or winogrande question,
  plus a random id), so no query's embedding can come from a cache;
- pinned (first embedder only, order alternating with routed): the same kind of prompts sent by
  expert name to the experts the round's routed phase chose, in its mix: no routing.

Reported: ``coe.routing_ms`` of the answered routed requests (p50/p99), the same from the
``coe_routing_latency_seconds`` histogram over every routed request (429s included; Prometheus
bucket interpolation, and the share within 5 ms, a bucket edge), the cache hits seen in
``coe_routing_cache_hits_total`` (must be 0), the share answered (200 vs 429), and end-to-end
latency routed vs pinned with a bootstrap CI of the difference of medians (a second, much
noisier view: generation and admission queueing dominate it).

What ``coe.routing_ms`` covers (``CoEService.decide``): from the moment the ingress hands the
query to the micro-batcher until the decision is back on the event loop, i.e. the wait behind
the batch in flight, the batch wait (``router.batch_wait_ms``), the hop to the worker thread,
the embedding, the scores and the policy, all under the CPU contention of the generation
running at the same time. The histogram observes the same interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

from bench.soak import Recorder, Service, free_port, stop_on_sigterm

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "routing"
TARGET_MS = 5.0


def prompts() -> list[str]:
    """Short real queries: the MBPP test tasks and the last question of each winogrande test prompt."""
    from coe.routers.datasets import load_routing_data

    mbpp = load_routing_data(DATA / "mbpp_test.csv").queries
    wino = [q.strip().split("\n\n")[-1] for q in load_routing_data(DATA / "winograde_test.csv").queries]
    return [q for q in mbpp + wino if q]


def unique(pool: list[str]) -> str:
    return f"{random.choice(pool)} (request {uuid.uuid4().hex[:12]})"


def embedder_config(alias: str, work: Path, *, refit: bool = True, nice: int | None = None) -> Path:
    """A copy of the default config with ``router.embedder: alias`` and (``refit``) the shipped kNN
    refitted with that embedder (same data, same params, no CV); ``nice`` sets every model
    expert's ``engine.nice``; paths made absolute."""
    import subprocess

    import yaml

    from coe.paths import default_config_path

    src = default_config_path()
    base = src.parent
    cfg = yaml.safe_load(src.read_text())

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if not Path(p).is_absolute() else p

    for e in cfg["experts"]:
        for key in ("adapter", "checkpoint"):
            if key in e:
                e[key] = absolute(e[key])
        if nice is not None and e.get("kind") == "model":
            e.setdefault("engine", {})["nice"] = nice
    s = cfg.setdefault("serving", {})
    s["adapter_roots"] = [absolute(p) for p in s.get("adapter_roots", [])]
    if "registry_path" in s:
        s["registry_path"] = absolute(s["registry_path"])
    shipped = json.loads((Path(absolute(cfg["router"]["fitted"])) / "router.json").read_text())
    stem = Path(alias).name      # an alias, or a model folder's name
    fitted = work / f"fitted-{stem}"
    cfg["router"]["embedder"] = alias
    if refit:
        cfg["router"].update(params=shipped["params"], fitted=str(fitted))
    else:
        cfg["router"]["fitted"] = absolute(cfg["router"]["fitted"])
    path = work / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if not refit:
        return path
    fit_cfg = work / f"{stem}-fit.yaml"
    fit_cfg.write_text(yaml.safe_dump({**cfg, "router": {k: v for k, v in cfg["router"].items() if k != "fitted"}},
                                      sort_keys=False))
    subprocess.run([sys.executable, "-m", "coe.tools.cli", "router", "fit", "--config", str(fit_cfg),
                    "--data", str(base / shipped["data"].removeprefix("configs/")), "--router", shipped["router"],
                    "--no-cv", "--quiet", "--out", str(fitted)], check=True, cwd=REPO)
    return path


async def scrape(rec: Recorder) -> dict:
    """The routing histogram's cumulative buckets, count, sum, the cache-hit counter and the
    routing batches' count and size sum now."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await rec.client.get("/metrics")).text
    out = {"buckets": {}, "count": 0.0, "sum": 0.0, "cache_hits": 0.0, "batches": 0.0, "batched": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "coe_routing_latency_seconds_bucket":
                out["buckets"][float(s.labels["le"])] = s.value
            elif s.name == "coe_routing_latency_seconds_count":
                out["count"] = s.value
            elif s.name == "coe_routing_latency_seconds_sum":
                out["sum"] = s.value
            elif s.name == "coe_routing_cache_hits_total":
                out["cache_hits"] = s.value
            elif s.name == "coe_routing_batch_size_count":
                out["batches"] = s.value
            elif s.name == "coe_routing_batch_size_sum":
                out["batched"] = s.value
    return out


def histogram_figures(before: dict, after: dict) -> dict:
    """p50/p99 (Prometheus ``histogram_quantile`` interpolation), mean and share ≤ 5 ms of the
    routings between two scrapes."""
    edges = sorted(after["buckets"])
    cum = [after["buckets"][e] - before["buckets"].get(e, 0.0) for e in edges]
    n = after["count"] - before["count"]

    def quantile(q: float) -> float:
        if n <= 0:
            return float("nan")
        rank, lo, below = q * n, 0.0, 0.0
        for edge, c in zip(edges, cum):
            if c >= rank:
                if math.isinf(edge):
                    return lo * 1000
                return 1000 * (lo + (edge - lo) * (rank - below) / (c - below) if c > below else edge)
            lo, below = edge, c
        return float("nan")

    within = cum[edges.index(TARGET_MS / 1000)] / n if n > 0 and TARGET_MS / 1000 in edges else float("nan")
    return {"routings": n, "p50_ms": quantile(0.5), "p99_ms": quantile(0.99),
            "mean_ms": 1000 * (after["sum"] - before["sum"]) / n if n > 0 else float("nan"),
            "share_within_5ms": within, "cache_hits": after["cache_hits"] - before["cache_hits"],
            "batches": (nb := after.get("batches", 0.0) - before.get("batches", 0.0)),
            "mean_batch": (after.get("batched", 0.0) - before.get("batched", 0.0)) / nb if nb > 0 else float("nan"),
            "buckets_ms": {("inf" if math.isinf(e) else f"{1000 * e:g}"): c for e, c in zip(edges, cum)}}


async def phase(rec: Recorder, seen: list[dict], models: list[str], pool: list[str], *, clients: int,
                requests: int, max_s: float, max_tokens: int) -> dict:
    """``clients`` closed-loop clients; request i goes to ``models[i % len(models)]``."""
    first_call, first_seen = len(rec.calls), len(seen)
    before = await scrape(rec)
    sent, until = 0, time.monotonic() + max_s

    async def one() -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < until:
            model = models[sent % len(models)]
            sent += 1
            await rec.chat(model, unique(pool), max_tokens=max_tokens)

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(clients)))
    wall = time.monotonic() - t0
    after = await scrape(rec)
    calls, bodies = rec.calls[first_call:], seen[first_seen:]
    statuses: dict[str, int] = {}
    for c in calls:
        statuses[str(c.status)] = statuses.get(str(c.status), 0) + 1
    return {"requests": len(calls), "seconds": round(wall, 1), "statuses": statuses,
            "answered_share": sum(c.status == 200 for c in calls) / max(len(calls), 1),
            "latency_s_200": [round(c.latency, 4) for c in calls if c.status == 200],
            "routing_ms_200": [round(b["routing_ms"], 3) for b in bodies if not b["pinned"]],
            "experts_200": [b["expert"] for b in bodies],
            "histogram": histogram_figures(before, after)}


async def run_service(url: str, pool: list[str], args, pinned: bool) -> dict:
    rec = Recorder(url, timeout_s=90.0)
    seen: list[dict] = []

    async def keep_coe(response) -> None:   # the response's ``coe`` field (Recorder keeps the header only)
        if response.request.url.path == "/v1/chat/completions" and response.status_code == 200:
            await response.aread()
            seen.append(response.json()["coe"])

    rec.client.event_hooks["response"].append(keep_coe)
    experts = [m["id"] for m in (await rec.client.get("/v1/models")).json()["data"] if m["id"] != "coe"]
    # warm-up: the embedder, and every expert's engine, once
    await asyncio.gather(*(rec.chat(m, unique(pool), max_tokens=args.max_tokens) for m in ["coe"] * 4 + experts))
    rounds = []
    for r in range(args.rounds):
        kw = {"clients": args.clients, "requests": args.requests, "max_s": args.phase_s, "max_tokens": args.max_tokens}
        out: dict = {}
        order = ["routed", "pinned"] if r % 2 == 0 else ["pinned", "routed"]
        mix = None
        for name in order if pinned else ["routed"]:
            if name == "routed":
                out[name] = await phase(rec, seen, ["coe"], pool, **kw)
                mix = out[name]["experts_200"]
            else:   # the previous round's routed mix when pinned goes first
                mix = mix or (rounds[-1]["routed"]["experts_200"] if rounds else None) or experts
                out[name] = await phase(rec, seen, random.sample(mix, len(mix)), pool, **kw)
            print(f"round {r} {name}: {out[name]['requests']} requests in {out[name]['seconds']} s, "
                  f"statuses {out[name]['statuses']}", flush=True)
        rounds.append(out)
    await rec.close()
    return {"rounds": rounds, "summary": summarize(rounds, pinned)}


def summarize(rounds: list[dict], pinned: bool) -> dict:
    from bench.stats import diff_ci
    from bench.stats import percentile as pct

    routed = [r["routed"] for r in rounds]
    ms = [x for p in routed for x in p["routing_ms_200"]]
    hist = {"routings": sum(p["histogram"]["routings"] for p in routed),
            "cache_hits": sum(p["histogram"]["cache_hits"] for p in routed)}
    # pool the buckets of every routed phase for the histogram figures
    edges = list(routed[0]["histogram"]["buckets_ms"])
    pooled = {e: sum(p["histogram"]["buckets_ms"][e] for p in routed) for e in edges}
    total = pooled.get("inf", 0.0)
    to_s = {e: (math.inf if e == "inf" else float(e) / 1000) for e in edges}
    after = {"buckets": {to_s[e]: c for e, c in pooled.items()}, "count": total,
             "sum": sum(p["histogram"]["mean_ms"] * p["histogram"]["routings"] / 1000
                        for p in routed if p["histogram"]["routings"]), "cache_hits": hist["cache_hits"]}
    hist = histogram_figures({"buckets": {}, "count": 0.0, "sum": 0.0, "cache_hits": 0.0}, after)
    out = {
        "routing_ms": {"n": len(ms), "p50": statistics.median(ms) if ms else float("nan"), "p99": pct(ms, 99),
                       "max": max(ms, default=float("nan"))},
        "histogram": {k: v for k, v in hist.items() if k != "buckets_ms"},
        "routed_requests": sum(p["requests"] for p in routed),
        "routed_answered_share": (sum(p["statuses"].get("200", 0) for p in routed)
                                  / max(sum(p["requests"] for p in routed), 1)),
        "routed_statuses": dict(sum((Counter(p["statuses"]) for p in routed), Counter())),
        "experts_routed": dict(sorted(Counter(e for p in routed for e in p["experts_200"]).items())),
    }
    lat_r = [x for p in routed for x in p["latency_s_200"]]
    out["e2e_routed_s"] = {"p50": statistics.median(lat_r) if lat_r else float("nan"), "p99": pct(lat_r, 99)}
    if pinned:
        pins = [r["pinned"] for r in rounds]
        lat_p = [x for p in pins for x in p["latency_s_200"]]
        out["e2e_pinned_s"] = {"p50": statistics.median(lat_p) if lat_p else float("nan"), "p99": pct(lat_p, 99)}
        d = diff_ci(lat_r, lat_p)
        out["e2e_added_ms"] = {"diff": 1000 * d["diff"], "ci": [1000 * d["ci"][0], 1000 * d["ci"][1]]}
        out["pinned_requests"] = sum(p["requests"] for p in pins)
        out["pinned_answered_share"] = (sum(p["statuses"].get("200", 0) for p in pins)
                                        / max(out["pinned_requests"], 1))
        out["pinned_statuses"] = dict(sum((Counter(p["statuses"]) for p in pins), Counter()))
        out["experts_pinned"] = dict(sorted(Counter(e for p in pins for e in p["experts_200"]).items()))
    return out


def markdown(results: dict, args) -> str:
    rows = []
    for alias, r in results.items():
        s = r["summary"]
        h, m = s["histogram"], s["routing_ms"]
        met = "met" if m["p50"] <= TARGET_MS and h["p50_ms"] <= TARGET_MS else "**not met**"
        rows.append(f"| `{alias}` | {m['p50']:.1f} / {m['p99']:.1f} (n={m['n']}) | {h['p50_ms']:.1f} / "
                    f"{h['p99_ms']:.1f} / {h['mean_ms']:.1f} (n={h['routings']:.0f}) | {100 * h['share_within_5ms']:.0f}% | "
                    f"{h['cache_hits']:.0f} | {100 * s['routed_answered_share']:.0f}% {s['routed_statuses']} | {met} |")
    text = (f"{args.clients} closed-loop clients, prompts unique (no embedding-cache hit possible), "
            f"`max_tokens` {args.max_tokens}, {args.rounds} rounds of at most {args.requests} requests or "
            f"{args.phase_s:g} s per phase; engine.nice "
            f"{'as configured' if args.nice is None else args.nice}. Target: routing adds ≤ {TARGET_MS:g} ms p50.\n\n"
            "| `router.embedder` | `coe.routing_ms` p50 / p99 (200s) | histogram p50 / p99 / mean ms (all routed) "
            "| routed ≤ 5 ms | cache hits | routed answered (statuses) | target |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n")
    for alias, r in results.items():
        s = r["summary"]
        text += (f"`{alias}`: service start {r['startup_s']} s; experts of the answered routed requests "
                 f"{s['experts_routed']}; end-to-end p50 / p99 routed {s['e2e_routed_s']['p50']:.2f} / "
                 f"{s['e2e_routed_s']['p99']:.2f} s")
        if "e2e_added_ms" in s:
            a = s["e2e_added_ms"]
            text += (f", pinned {s['e2e_pinned_s']['p50']:.2f} / {s['e2e_pinned_s']['p99']:.2f} s "
                     f"(answered {100 * s['pinned_answered_share']:.0f}%, {s['pinned_statuses']}, experts "
                     f"{s['experts_pinned']}); routed − pinned median {a['diff']:+.0f} ms, 95% CI "
                     f"[{a['ci'][0]:+.0f}, {a['ci'][1]:+.0f}] ms")
        text += ".\n\n"
        for i, rnd in enumerate(r["rounds"]):
            for name, p in rnd.items():
                hh = p["histogram"]
                text += (f"- round {i} {name}: {p['requests']} requests in {p['seconds']} s, {p['statuses']}; "
                         f"histogram routings {hh['routings']:.0f}, p50 {hh['p50_ms']:.1f} ms, cache hits "
                         f"{hh['cache_hits']:.0f}, routing batches {hh.get('batches', 0):.0f} "
                         f"(mean {hh.get('mean_batch', float('nan')):.1f} queries)\n")
        text += "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    from bench.record import RunRecord, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200, help="at most this many requests per phase")
    ap.add_argument("--phase-s", type=float, default=30.0, help="stop sending after this many seconds per phase")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--embedders", default="", help="comma-separated router.embedder aliases; the first (default: "
                    "the default config's) also gets the pinned phases")
    ap.add_argument("--nice", type=int, default=None, help="set every engine's engine.nice (default: as configured)")
    ap.add_argument("--name", default="serve_routing")
    args = ap.parse_args(argv)
    rec = RunRecord.start(note="coe serve on the default config (other embedders: a copy, kNN refitted); "
                               f"{args.clients} closed-loop clients.")
    stop_on_sigterm()
    from coe.config import load_config

    default = load_config().router.embedder
    aliases = [a for a in args.embedders.split(",") if a] or [default]
    pool = prompts()
    results = {}
    with tempfile.TemporaryDirectory(prefix="coe-serve-routing-") as tmp:
        for i, alias in enumerate(aliases):
            same = alias == default
            config = None if same and args.nice is None else str(
                embedder_config(alias, Path(tmp), refit=not same, nice=args.nice))
            svc = Service(free_port(), config)
            try:
                out = asyncio.run(run_service(svc.url, pool, args, pinned=i == 0))
            finally:
                stop = svc.stop()
            results[alias] = {**out, "startup_s": round(svc.startup_s, 1), "stop": stop}
    data = rec.finish({"args": vars(args), "results": results})
    md = rec.markdown_header("Routing added inside the service at 32 concurrent clients") + markdown(results, args)
    write_results(args.name, data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
