"""Load-aware against quality-only routing on the default service, one expert driven past capacity
(issue #25, live target).

    python -m bench.load_routing [--repeats 3] [--seconds 90] [--load 2.0] [--load-weight 0.1]
    python -m bench.load_routing --smoke        # a few requests: does the pipeline run?

The service is ``coe serve`` on the embedded default config (``bench.soak.Service``), started
once per arm and repeat, with ``router.policy.load_weight`` set to 0 (``quality``: today's routing)
or to μ (``load-aware``); nothing else differs. Arms are interleaved (``q, l`` then ``l, q``, ...).

The query mix (:data:`MIX`): questions whose two best predicted experts, by the shipped kNN
router with ``router.outside_profile: descriptions`` (both arms), are ``qwen-coder`` (first) and
``smollm2`` (second), a few hundredths apart, and on
different engines: qwen-coder has a vLLM engine of its own, while a SmolLM2 LoRA would share
smollm2's engine, and so its admission slots and its queue, which leaves nothing to balance.
Every run checks the mix with ``POST /v1/route`` and records both predictions per query.

1. Capacity (first service only, pinned to ``qwen-coder``): ``--capacity-clients`` closed-loop
   clients (default: the server's admission bound, ``serving.admission.max_running_per_server``)
   for ``--capacity-s`` seconds; capacity = answered requests per second.
2. Per arm: Poisson arrivals at ``--load`` × capacity for ``--seconds``, routed (``model: coe``,
   the mix in turn, ``coe: {trace: true}``), greedy, ``--max-tokens``; the run waits for every
   answer. Per request: status, latency, the expert that answered, and from the plan in the
   response the predicted quality of that expert and of the plan's best one.

Reported per arm (requests of all repeats pooled): p50 and p99 latency of the answered requests
with bootstrap 95% intervals, answered (2xx) / 429 / other errors, mean predicted quality of the
answered requests, each expert's share; and per repeat the p99 ratio quality / load-aware.
Targets (issue #25): p99 ratio >= 2, answered >=, mean predicted quality within 0.02.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.record import RunRecord, conclude
from bench.soak import Service, free_port, stop_on_sigterm
from bench.stats import bootstrap_ci, paired_ratio, percentile

TOP, SECOND = "qwen-coder", "smollm2"
# qwen-coder first and smollm2 second by the shipped kNN (configs/fitted/default, minilm-l6-int8),
# 0.015 to 0.03 apart (0.02 on average): these questions are outside the task profiles (MBPP,
# GSM8K), and with router.outside_profile: descriptions (set in both arms) the router scores them
# against the experts' descriptions and examples. Under the default, profile_mean, every such
# question gets the profile means (qwen-coder 0.2, the next 0.0625): no near tie left to balance.
MIX_OUTSIDE_PROFILE = "descriptions"
MIX = [
    "Explain how email is delivered.",
    "How does encryption keep data safe?",
    "How does a cache improve performance?",
    "How do vaccines work?",
    "What is the difference between memory and storage?",
    "Explain the difference between a process and a thread.",
]
ARMS = ("quality", "load-aware")
TARGETS = {"p99_ratio": 2.0, "quality_within": 0.02}


def arm_config(folder: Path, name: str, load_weight: float) -> Path:
    """The embedded default config with ``router.policy.load_weight`` set and ``router.outside_profile:
    descriptions`` (see :data:`MIX`), written to ``folder`` (paths already absolute: the loader
    resolved them against the default's folder)."""
    import yaml

    from coe.config import load_config

    cfg = load_config(None)
    cfg.router.policy.load_weight = load_weight
    cfg.router.outside_profile = MIX_OUTSIDE_PROFILE
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False))
    return path


def chat_body(prompt: str, model: str, max_tokens: int) -> dict:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "coe": {"trace": True},
            "messages": [{"role": "user", "content": prompt}]}


async def send(http, prompt: str, model: str, max_tokens: int) -> dict:
    """One chat request: status, latency, the expert that answered and, from the response's plan,
    its predicted quality and the best predicted quality of the plan."""
    import httpx

    t0 = time.monotonic()
    out: dict = {"status": None, "expert": None, "quality": None, "best_quality": None}
    try:
        r = await http.post("/v1/chat/completions", json=chat_body(prompt, model, max_tokens))
        out["status"] = r.status_code
        if r.status_code == 200:
            info = r.json().get("coe") or {}
            out["expert"] = info.get("expert")
            cands = info.get("candidates") or []
            q = {c["expert"]: c.get("quality") for c in cands}
            out["quality"] = q.get(out["expert"])
            out["resident"] = next((c.get("resident") for c in cands if c["expert"] == out["expert"]), None)
            known = [v for v in q.values() if v is not None]
            out["best_quality"] = max(known) if known else None
            if cands:   # the live state the policy weighed for the expert it ranked first
                out["top_wait_ms"], out["top_queue"] = cands[0]["expected_wait_ms"], cands[0]["queue_depth"]
    except httpx.TimeoutException:
        out["error"] = "timeout"
    except httpx.HTTPError as err:
        out["error"] = type(err).__name__
    out["latency_s"] = time.monotonic() - t0
    return out


def client(url: str, timeout_s: float):
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=timeout_s,
                             limits=httpx.Limits(max_connections=1024, max_keepalive_connections=1024))


async def check_mix(url: str) -> list[dict]:
    """``/v1/route`` on each query of the mix (an idle service): the two best predictions."""
    async with client(url, 60) as http:
        out = []
        for q in MIX:
            r = await http.post("/v1/route", json={"query": q})
            r.raise_for_status()
            cands = [c for c in r.json()["candidates"] if c["quality"] is not None]
            out.append({"query": q, "first": [cands[0]["expert"], round(cands[0]["quality"], 4)],
                        "second": [cands[1]["expert"], round(cands[1]["quality"], 4)],
                        "gap": round(cands[0]["quality"] - cands[1]["quality"], 4)})
        return out


async def warm_up(url: str, max_tokens: int) -> None:
    """One request to each of the two experts, so no arm pays a first-request cost under load."""
    async with client(url, 300) as http:
        for e in (TOP, SECOND):
            r = await send(http, MIX[0], e, max_tokens)
            if r["status"] != 200:
                raise RuntimeError(f"warm-up request to {e} failed: {r}")


async def capacity(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """Answered requests per second of ``clients`` closed-loop clients pinned to :data:`TOP`."""
    done: list[dict] = []
    until = time.monotonic() + seconds

    async def one(http, k: int) -> None:
        i = k
        while time.monotonic() < until:
            done.append(await send(http, MIX[i % len(MIX)], TOP, max_tokens))
            i += clients

    async with client(url, 600) as http:
        t0 = time.monotonic()
        await asyncio.gather(*(one(http, k) for k in range(clients)))
        wall = time.monotonic() - t0
    ok = [d for d in done if d["status"] == 200]
    return {"clients": clients, "seconds": round(wall, 1), "answered": len(ok), "other": len(done) - len(ok),
            "rps": len(ok) / wall, "latency_p50_s": percentile([d["latency_s"] for d in ok], 50)}


async def open_loop(url: str, rate: float, seconds: float, max_tokens: int, seed: int, timeout_s: float) -> list[dict]:
    """Poisson arrivals at ``rate``/s for ``seconds``, routed, the mix in turn; waits for every answer."""
    rng = random.Random(seed)
    tasks = []
    async with client(url, timeout_s) as http:
        t0 = time.monotonic()
        at, i = 0.0, 0
        while at < seconds:
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            tasks.append(asyncio.create_task(send(http, MIX[i % len(MIX)], "coe", max_tokens)))
            i += 1
            at += rng.expovariate(rate)
        return list(await asyncio.gather(*tasks))


def p99(values: list[float]) -> float:
    return percentile(values, 99)


def arm_summary(records: list[dict]) -> dict:
    """What one arm did over every request it sent (see the module doc)."""
    ok = [r for r in records if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    quality = [r["quality"] for r in ok if r["quality"] is not None]
    best = [r["best_quality"] for r in ok if r["best_quality"] is not None]
    served = Counter(r["expert"] for r in ok)
    return {
        "sent": len(records), "answered": len(ok), "http_429": sum(r["status"] == 429 for r in records),
        "errors": sum(r["status"] not in (200, 429) for r in records),
        "error_kinds": dict(Counter(str(r["status"] or r.get("error")) for r in records if r["status"] not in (200, 429))),
        "latency_s": {"p50": percentile(lat, 50), "p50_ci": list(bootstrap_ci(lat, lambda v: percentile(v, 50))),
                      "p99": p99(lat), "p99_ci": list(bootstrap_ci(lat, p99)), "max": max(lat, default=float("nan"))},
        "mean_quality": sum(quality) / len(quality) if quality else float("nan"),
        "mean_best_quality": sum(best) / len(best) if best else float("nan"),
        "share": {e: n / len(ok) for e, n in served.most_common()} if ok else {},
        "mean_top_wait_ms": _mean([r.get("top_wait_ms") for r in ok]),
    }


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def run_arm(arm: str, config: Path, rate: float | None, args, seed: int) -> dict:
    """One service start: warm-up, the capacity phase when ``rate`` is None, the open-loop phase."""
    service = Service(free_port(), str(config))
    try:
        out: dict = {"arm": arm, "startup_s": round(service.startup_s, 1)}
        out["mix"] = asyncio.run(check_mix(service.url))
        asyncio.run(warm_up(service.url, args.max_tokens))
        if rate is None:
            cap = asyncio.run(capacity(service.url, args.capacity_clients, args.capacity_s, args.max_tokens))
            if cap["answered"] == 0:
                raise RuntimeError(f"no request to {TOP} was answered in the capacity phase: {cap}")
            out["capacity"] = cap
            rate = args.load * cap["rps"]
            time.sleep(args.rest_s)   # let the queue of the capacity phase drain out of the averages
        out["rate_rps"] = rate
        t0 = time.monotonic()
        out["records"] = asyncio.run(open_loop(service.url, rate, args.seconds, args.max_tokens, seed,
                                               args.timeout_s))
        out["wall_s"] = round(time.monotonic() - t0, 1)
    finally:
        out["stop"] = service.stop()
    s = arm_summary(out["records"])
    print(f"{arm}: {s['answered']}/{s['sent']} answered, {s['http_429']} x 429, p99 {s['latency_s']['p99']:.2f} s, "
          f"quality {s['mean_quality']:.4f}, share {s['share']}", flush=True)
    return out


def compare(res: dict) -> dict:
    """Pooled summaries per arm, paired p99 ratios per repeat, and the targets."""
    arms = {a: arm_summary([r for run in res["runs"] if run["arm"] == a for r in run["records"]]) for a in ARMS}
    per_round = {a: [arm_summary(run["records"])["latency_s"]["p99"] for run in res["runs"] if run["arm"] == a]
                 for a in ARMS}
    q, lw = arms["quality"], arms["load-aware"]
    ratio = q["latency_s"]["p99"] / lw["latency_s"]["p99"] if lw["latency_s"]["p99"] else float("nan")
    quality_drop = q["mean_quality"] - lw["mean_quality"]
    return {
        "arms": arms,
        "p99_per_repeat_s": per_round,
        "p99_ratio_pooled": ratio,
        "p99_ratio_per_repeat": paired_ratio(per_round["quality"], per_round["load-aware"]),
        "quality_drop": quality_drop,
        "targets": {
            "p99_ratio_at_least_2": ratio >= TARGETS["p99_ratio"],
            "answered_at_least_as_many": lw["answered"] >= q["answered"],
            "quality_within_0.02": abs(quality_drop) <= TARGETS["quality_within"],
        },
    }


def markdown(res: dict, cmp: dict) -> str:
    cap = res["capacity"]
    lines = [
        (f"Mix of {len(MIX)} questions, {TOP} predicted best and {SECOND} second "
        f"(gaps {', '.join(str(m['gap']) for m in res['mix'])}, from `/v1/route`). "
        f"Capacity of {TOP}: {cap['rps']:.2f} requests/s ({cap['clients']} closed-loop clients, "
        f"{cap['seconds']} s, max_tokens {res['max_tokens']}); offered load {res['load']} x that = "
        f"{res['rate_rps']:.2f} requests/s, Poisson, {res['seconds']} s per arm, {res['repeats']} interleaved "
        f"repeat(s); load-aware μ = {res['load_weight']}."), "",
        "| arm | sent | answered | 429 | errors | p50 s [95% CI] | p99 s [95% CI] | mean predicted quality | share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a, s in cmp["arms"].items():
        lat = s["latency_s"]
        share = ", ".join(f"{e} {v:.0%}" for e, v in s["share"].items())
        lines.append(f"| {a} | {s['sent']} | {s['answered']} | {s['http_429']} | {s['errors']} | "
                     f"{lat['p50']:.2f} [{lat['p50_ci'][0]:.2f}, {lat['p50_ci'][1]:.2f}] | "
                     f"{lat['p99']:.2f} [{lat['p99_ci'][0]:.2f}, {lat['p99_ci'][1]:.2f}] | "
                     f"{s['mean_quality']:.4f} | {share} |")
    t = cmp["targets"]
    pr = cmp["p99_ratio_per_repeat"]
    per = f"median {pr['median']:.2f} [{pr['min']:.2f}–{pr['max']:.2f}]" if pr.get("n") else "n/a"

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines += ["", (f"- p99 ratio quality / load-aware: **{cmp['p99_ratio_pooled']:.2f}x** pooled, per repeat {per} "
              f"(target >= 2: {mark(t['p99_ratio_at_least_2'])})"),
              (f"- answered: {cmp['arms']['load-aware']['answered']} load-aware vs {cmp['arms']['quality']['answered']} "
              f"quality-only (target >=: {mark(t['answered_at_least_as_many'])})"),
              (f"- mean predicted quality drop: {cmp['quality_drop']:+.4f} (target within 0.02: "
              f"{mark(t['quality_within_0.02'])})"),
              "", ("Latency: arrival to the full answer, answered requests only. Predicted quality: the plan's "
              "quality of the expert that answered (the response's `coe.candidates`).")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each arm (a service start each)")
    ap.add_argument("--seconds", type=float, default=90.0, help="open-loop phase per arm")
    ap.add_argument("--load", type=float, default=2.0, help="offered load, in multiples of the top expert's capacity")
    ap.add_argument("--load-weight", type=float, default=0.1, help="μ of the load-aware arm (router.policy.load_weight)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--capacity-clients", type=int, default=None,
                    help="closed-loop clients of the capacity phase (default: serving.admission.max_running_per_server)")
    ap.add_argument("--capacity-s", type=float, default=45.0)
    ap.add_argument("--rate", type=float, default=None, help="offered requests/s (skips the capacity phase)")
    ap.add_argument("--rest-s", type=float, default=5.0, help="pause between the capacity and the load phase")
    ap.add_argument("--timeout-s", type=float, default=180.0, help="client timeout per request")
    ap.add_argument("--name", default="load_routing")
    ap.add_argument("--smoke", action="store_true", help="a few requests, one repeat: checks that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeats, args.seconds, args.capacity_s, args.max_tokens, args.rest_s = 1, 4.0, 4.0, 4, 0.0
        args.capacity_clients = args.capacity_clients or 2
        args.name = args.name if args.name != "load_routing" else "load_routing_smoke"
    if args.capacity_clients is None:
        from coe.config import load_config

        args.capacity_clients = load_config(None).serving.admission.max_running_per_server or 8
    stop_on_sigterm()
    rec = RunRecord.start(note=f"coe serve on the default config, {TOP} driven to {args.load}x its capacity")
    res: dict = {"mix_queries": MIX, "top": TOP, "second": SECOND, "load": args.load, "load_weight": args.load_weight,
                 "max_tokens": args.max_tokens, "seconds": args.seconds, "repeats": args.repeats, "smoke": args.smoke,
                 "runs": []}
    rate = args.rate
    with tempfile.TemporaryDirectory() as tmp:
        configs = {"quality": arm_config(Path(tmp), "quality", 0.0),
                   "load-aware": arm_config(Path(tmp), "load-aware", args.load_weight)}
        for r in range(args.repeats):
            for k, arm in enumerate(ARMS[r % 2:] + ARMS[: r % 2]):
                run = run_arm(arm, configs[arm], rate, args, seed=r)   # both arms of a repeat: same arrivals
                if rate is None:
                    res["capacity"], rate = run["capacity"], run["rate_rps"]
                res["runs"].append({**run, "repeat": r, "order": k})
    res["rate_rps"] = rate
    res.setdefault("capacity", {"rps": rate / args.load, "clients": 0, "seconds": 0, "given": True})
    res["mix"] = res["runs"][0]["mix"]
    return conclude(rec, args.name, "Load-aware routing under load (default service)", res,
                    compare=compare, markdown=markdown)


if __name__ == "__main__":
    main()
