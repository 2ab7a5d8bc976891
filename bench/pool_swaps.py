"""Swaps per 100 requests in the expert pool: quality-only against swap-aware routing (issue #25).

    python -m bench.pool_swaps [--experts 8] [--resident 2] [--requests 100] [--rounds 3]
    python -m bench.pool_swaps --smoke          # a few requests: does the pipeline run?

More experts than fit: ``--experts`` pooled copies of SmolLM2-135M-Instruct (real weights,
``--model``; one host copy each), each with its own description (:data:`DOMAINS`), at most
``--resident`` of them on the device (``serving.pool.swap: always``, so the CPU swaps too).
The router is ``centroid`` over the descriptions and examples (what a new deployment without
profiles uses); the policy is the service's (``routers/policy.py``).

It runs the ingress's own code in this process: :class:`coe.serving.api.service.CoEService` with
the real pool engine behind :class:`coe.serving.api.backend.LocalBackend` and the real FastAPI app
(``httpx.ASGITransport``): the decision, the admission queue, :class:`LiveState` (which reads the
pool's residency and measured swap-in times at most once a second, as in ``coe serve``) and the
pool's scheduler are the service's; only the Ray Serve hop is left out (it carries requests,
it makes no decision). This is what the backend module calls a benchmark of the bare logic.

One service, several arms, switched between rounds by the service's policy (``load_weight``):

- ``quality``: ``load_weight`` 0, today's routing;
- ``swap-aware w`` for each ``w`` of ``--swap-worth``: ``load_weight`` μ = w / (the pool's
  measured swap-in seconds after the warm-up), so a swap-in counts as much as w of predicted
  quality (a query moves to a resident expert when its predicted quality is less than w lower).

Per round each arm gets the same ``--requests`` routed chat requests (the mix in a seeded random
order, Poisson arrivals at ``--rate``/s, greedy, ``--max-tokens``); arms alternate which goes
first (rotated). Counted per arm: the pool's swaps (its ``swaps`` counter before and after),
per 100 requests, and the mean predicted quality of the expert that answered (the plan in the
response's ``coe`` trace). Targets: a swap-aware arm makes at most 70% of quality-only's swaps,
losing at most 0.02 of mean predicted quality.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.load_routing import send
from bench.record import RunRecord, conclude
from bench.stats import summary

QUALITY = "quality"
TARGETS = {"swap_share": 0.70, "quality_loss": 0.02}
# (expert id, description, examples): neighbouring domains, so that many questions have two
# experts of close predicted quality
DOMAINS = [
    ("cooking", "Recipes, cooking techniques and kitchen tips.",
     ["How do I make a tomato sauce?", "How long should I boil an egg?"]),
    ("nutrition", "Diet, nutrition, vitamins and healthy eating advice.",
     ["How much protein do I need a day?", "Which foods are high in fiber?"]),
    ("fitness", "Exercise, training plans, running and sports performance.",
     ["How do I start running?", "What is a good beginner workout plan?"]),
    ("medicine", "Symptoms, illnesses, medicines and general health questions.",
     ["What are the symptoms of the flu?", "Can I take ibuprofen with paracetamol?"]),
    ("finance", "Personal finance: budgeting, saving, investing and taxes.",
     ["How do I make a monthly budget?", "What is an index fund?"]),
    ("travel", "Travel planning: destinations, packing, flights and hotels.",
     ["What should I pack for a week in Italy?", "How do I find cheap flights?"]),
    ("gardening", "Growing vegetables, plants and flowers; garden care.",
     ["When should I plant tomatoes?", "How often should I water succulents?"]),
    ("pets", "Caring for dogs, cats and other pets.",
     ["How often should I walk my dog?", "What should I feed a kitten?"]),
]
# questions between two of those domains, the two a few hundredths apart by the centroid router
# (0.006 to 0.048, 0.027 on average, over all eight experts)
MIX = [
    "What should I eat before a long run?",
    "How do I cook the vegetables from my garden?",
    "What vegetables are easy to grow and cook?",
    "Which garden plants are poisonous to cats?",
    "How do I avoid getting sick on a long flight?",
    "What human food is healthy for dogs?",
    "How do I cook healthy meals on a budget?",
    "Is it safe to feed my dog vegetables from the garden?",
    "Which vitamins help muscles recover after training?",
    "What should I eat after a workout?",
    "What medicines should I pack for a trip abroad?",
    "Is coffee bad for your health?",
]


def pool_config(model: str, n: int, resident: int, dtype: str, embedder: str) -> dict:
    """The service config: ``n`` pooled copies of ``model`` with :data:`DOMAINS`' descriptions."""
    if not 2 <= n <= len(DOMAINS):
        raise SystemExit(f"--experts must be between 2 and {len(DOMAINS)}, got {n}")
    if not 1 <= resident < n:
        raise SystemExit(f"--resident must be between 1 and --experts - 1 ({n - 1}), got {resident}")
    engine = {"kind": "hf", "device": "cpu", "dtype": dtype, "max_num_seqs": 8, "max_model_len": 512}
    return {
        "version": 1,
        "router": {"name": "centroid", "embedder": embedder, "policy": {"mode": "max_quality"}},
        "experts": [{"id": eid, "kind": "model", "model": model, "description": desc, "examples": ex,
                     "engine": engine, "pooled": True} for eid, desc, ex in DOMAINS[:n]],
        "serving": {"pool": {"max_resident": resident, "swap": "always", "policy": "largest_group",
                             "prefetch": False}},
    }


class InProcessService:
    """The ingress logic, the real pool engine and the HTTP app in this process (see module doc)."""

    def __init__(self, config) -> None:
        self.config = config

    async def __aenter__(self) -> Self:
        import httpx

        from coe.routers import build_online_router
        from coe.serving.api.backend import LocalBackend
        from coe.serving.api.routes import create_api
        from coe.serving.api.service import CoEService
        from coe.serving.deployments.spec import plan_servers

        experts = list(self.config.experts)
        specs = plan_servers(experts, base_dir=None, batching=self.config.serving.batching,
                             pool=self.config.serving.pool)
        self.backend = LocalBackend(specs)
        await self.backend.start()
        router = build_online_router(self.config.router, experts)
        self.service = CoEService(self.config, backend=self.backend, router=router, experts=experts)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_api(self.service)),
                                      base_url="http://coe", timeout=600)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await self.service.close()
        await self.backend.stop()

    async def pool(self) -> dict:
        """The pool engine's stats (``PoolEngine.stats``: swaps, resident, swap_in_s, ...)."""
        from coe.serving.deployments.spec import POOL_SERVER

        return (await self.backend.stats())[POOL_SERVER]["engine"]

    def use(self, load_weight: float) -> None:
        """Route with ``load_weight`` from the next request on."""
        self.service.policy = dataclasses.replace(self.service.policy, load_weight=load_weight)


def workload(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(MIX) for _ in range(n)]


async def one_round(svc: InProcessService, prompts: list[str], rate: float, max_tokens: int, seed: int) -> dict:
    """``prompts`` routed, Poisson arrivals at ``rate``/s; the pool's swaps over the round."""
    before = await svc.pool()
    rng = random.Random(seed)
    tasks = []
    t0 = time.monotonic()
    at = 0.0
    for p in prompts:
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        tasks.append(asyncio.create_task(send(svc.http, p, "coe", max_tokens)))
        at += rng.expovariate(rate)
    records = list(await asyncio.gather(*tasks))
    after = await svc.pool()
    ok = [r for r in records if r["status"] == 200]
    quality = [r["quality"] for r in ok if r["quality"] is not None]
    best = [r["best_quality"] for r in ok if r["best_quality"] is not None]
    swaps = after["swaps"] - before["swaps"]
    return {"requests": len(records), "answered": len(ok), "swaps": swaps, "hits": after["hits"] - before["hits"],
            "swaps_per_100": 100 * swaps / len(records), "wall_s": round(time.monotonic() - t0, 1),
            "mean_quality": sum(quality) / len(quality) if quality else float("nan"),
            "mean_best_quality": sum(best) / len(best) if best else float("nan"),
            "share": dict(Counter(r["expert"] for r in ok).most_common()),
            # what the plan knew of the answering expert's residency when it decided (None: not read yet)
            "planned_resident": dict(Counter(str(r.get("resident")) for r in ok))}


async def measure(args) -> dict:
    from coe.config import parse_config

    config = parse_config(pool_config(args.model, args.experts, args.resident, args.dtype, args.embedder))
    res: dict = {"rounds": []}
    async with InProcessService(config) as svc:
        t0 = time.monotonic()
        for eid, _, _ in DOMAINS[: args.experts]:   # warm-up: every expert swapped in once, untimed
            r = await send(svc.http, MIX[0], eid, args.max_tokens)
            if r["status"] != 200:
                raise RuntimeError(f"warm-up request to {eid} failed: {r}")
        res["warmup_s"] = round(time.monotonic() - t0, 1)
        stats = await svc.pool()
        swap_s = sorted(v for v in stats["swap_in_s"].values() if v)
        if not swap_s:
            raise RuntimeError(f"the pool measured no swap-in during the warm-up: {stats}")
        res["swap_in_s"] = swap_s[len(swap_s) // 2]
        weights = {QUALITY: 0.0, **{f"swap-aware {w:g}": w / res["swap_in_s"] for w in args.swap_worth}}
        res["load_weight"] = weights
        arms = list(weights)
        for r in range(args.rounds):
            prompts = workload(args.requests, seed=r)
            for k, arm in enumerate(arms[r % len(arms):] + arms[: r % len(arms)]):
                svc.use(weights[arm])
                out = await one_round(svc, prompts, args.rate, args.max_tokens, seed=r)
                res["rounds"].append({"arm": arm, "round": r, "order": k, **out})
                print(f"round {r} {arm}: {out['swaps']} swaps / {out['requests']} requests, "
                      f"quality {out['mean_quality']:.4f}, share {out['share']}", flush=True)
        res["pool_end"] = {k: v for k, v in (await svc.pool()).items() if k != "swap_in_s"}
    return res


def compare(res: dict) -> dict:
    """Per arm over its rounds, and each swap-aware arm against quality-only (round by round too)."""
    by = {a: [r for r in res["rounds"] if r["arm"] == a] for a in res["load_weight"]}
    arms = {}
    for a, rounds in by.items():
        n = sum(r["requests"] for r in rounds)
        arms[a] = {"requests": n, "answered": sum(r["answered"] for r in rounds),
                   "swaps": sum(r["swaps"] for r in rounds),
                   "swaps_per_100": 100 * sum(r["swaps"] for r in rounds) / n if n else float("nan"),
                   "swaps_per_100_by_round": summary([r["swaps_per_100"] for r in rounds]),
                   "mean_quality": sum(r["mean_quality"] * r["answered"] for r in rounds)
                   / max(1, sum(r["answered"] for r in rounds))}
    q = arms[QUALITY]
    versus = {}
    for a, s in arms.items():
        if a == QUALITY:
            continue
        share = s["swaps"] / q["swaps"] if q["swaps"] else float("nan")
        loss = q["mean_quality"] - s["mean_quality"]
        per_round = [b["swaps"] / x["swaps"] for x, b in zip(by[QUALITY], by[a], strict=True) if x["swaps"]]
        versus[a] = {"swap_share": share, "swap_share_by_round": summary(per_round), "quality_loss": loss,
                     "swaps_at_most_70pct": share <= TARGETS["swap_share"],
                     "quality_loss_at_most_0.02": loss <= TARGETS["quality_loss"]}
    return {"arms": arms, "versus_quality": versus,
            "targets_met_by": [a for a, v in versus.items()
                               if v["swaps_at_most_70pct"] and v["quality_loss_at_most_0.02"]],
            "answered_all": all(a["answered"] == a["requests"] for a in arms.values())}


def markdown(res: dict, cmp: dict) -> str:
    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    mus = ", ".join(f"{a} μ = {w:.3g}" for a, w in res["load_weight"].items() if a != QUALITY)
    lines = [(f"{res['experts']} pooled copies of `{res['model']}` ({res['dtype']}), room for {res['resident']} "
              f"(`swap: always`, `largest_group`, no prefetch); centroid router over the experts' descriptions; "
              f"{res['requests']} routed requests per round and arm ({len(MIX)} questions between two domains, "
              f"Poisson at {res['rate']}/s, max_tokens {res['max_tokens']}), {res['n_rounds']} interleaved round(s). "
              f"Measured swap-in {res['swap_in_s'] * 1000:.1f} ms (median over the experts after the warm-up); "
              f"{mus}."), "",
             ("| arm | requests | answered | swaps | swaps / 100 requests | per round, median [min–max] | "
             "mean predicted quality | swaps vs quality-only | quality loss |"), "|---|---|---|---|---|---|---|---|---|"]
    for a, s in cmp["arms"].items():
        pr = s["swaps_per_100_by_round"]
        v = cmp["versus_quality"].get(a)
        vs = (f"{v['swap_share']:.0%} ({mark(v['swaps_at_most_70pct'])}) | {v['quality_loss']:+.4f} "
              f"({mark(v['quality_loss_at_most_0.02'])})") if v else "| "
        lines.append(f"| {a} | {s['requests']} | {s['answered']} | {s['swaps']} | {s['swaps_per_100']:.1f} | "
                     f"{pr['median']:.1f} [{pr['min']:.1f}–{pr['max']:.1f}] | {s['mean_quality']:.4f} | {vs} |")
    met = ", ".join(cmp["targets_met_by"]) or "none"
    lines += ["", (f"Targets (at most 70% of quality-only's swaps, predicted quality loss at most 0.02) met by: "
                  f"**{met}**. Predicted quality: the plan's quality (centroid cosine) of the expert that answered.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="every pooled expert's model (alias or folder)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--embedder", default="minilm-l6-int8")
    ap.add_argument("--experts", type=int, default=len(DOMAINS))
    ap.add_argument("--resident", type=int, default=2)
    ap.add_argument("--requests", type=int, default=100, help="routed requests per round and arm")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals per second")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--swap-worth", type=lambda v: [float(x) for x in v.split(",")], default=[0.02, 0.05, 0.1],
                    help="comma-separated: one swap-aware arm per value, the predicted quality a swap-in is worth "
                         "(μ = value / measured swap-in seconds)")
    ap.add_argument("--name", default="pool_swaps")
    ap.add_argument("--smoke", action="store_true", help="a few requests, one round: checks that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.rounds, args.max_tokens, args.rate, args.swap_worth = 6, 1, 2, 20.0, [0.05]
        args.experts, args.resident = min(args.experts, 3), 1
        args.name = args.name if args.name != "pool_swaps" else "pool_swaps_smoke"
    rec = RunRecord.start(note="the ingress logic in-process (LocalBackend) over the real expert pool")
    res = asyncio.run(measure(args))
    res.update({"model": args.model, "dtype": args.dtype, "experts": args.experts, "resident": args.resident,
                "requests": args.requests, "n_rounds": args.rounds, "rate": args.rate, "max_tokens": args.max_tokens,
                "swap_worth": args.swap_worth, "mix": MIX, "smoke": args.smoke})
    return conclude(rec, args.name, "Swaps in the expert pool: swap-aware routing", res,
                    compare=compare, markdown=markdown)


if __name__ == "__main__":
    main()
