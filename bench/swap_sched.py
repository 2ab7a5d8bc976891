"""Expert-grouped scheduling vs first-come-first-served on the same pool, mixed workload.

16 randomly initialised experts of one llama shape, room for 4 on the device (``max_resident=4``,
``swap='always'`` so the CPU run swaps too). The same workload runs through a ``PoolEngine``
per policy, one after the other in one process: ``--requests`` chat requests whose experts
follow a Zipf popularity (s = ``--zipf``) in random order, arriving open-loop (Poisson,
``--rate`` per second), greedy, ``--max-tokens`` new tokens each. Reported per policy:
completion tokens per second over the makespan (first arrival → last answer), latency
(arrival → last token) p50 / p99, swaps, sessions and the mean batch per session.

Greedy decoding makes both policies produce the same tokens; the script checks it.

Run: ``.venv/bin/python bench/swap_sched.py`` (CPU here; on a GPU machine the same command).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.record import RunRecord, write_results
from bench.stats import fmt, paired_ratio, percentile, summary
from bench.swap_common import PRESETS, make_experts, quiet

QUESTIONS = [
    "What is the capital of France?", "Write a python function that adds two numbers.",
    "How do I sort a list?", "What is 12 times 7?", "Explain recursion briefly.",
    "Name a prime number above 50.", "What is the boiling point of water?", "Translate hello to French.",
]


def workload(n: int, experts: list[str], zipf: float, rate: float, seed: int) -> list[tuple[float, str, str]]:
    """``(arrival_s, expert, question)`` sorted by arrival; expert popularity ∝ 1 / rank**zipf."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) ** zipf for rank in range(len(experts))]
    t, out = 0.0, []
    for _ in range(n):
        out.append((t, rng.choices(experts, weights)[0], rng.choice(QUESTIONS)))
        t += rng.expovariate(rate)
    return out


async def run_policy(policy: str, experts: dict[str, str], args, load) -> dict:
    from coe.config import EngineConfig, PoolConfig
    from coe.serving.pool.engine import PoolEngine
    from coe.types import ChatMessage, Dispatch, GenerationOutput, GenerationRequest, SamplingParams

    engine = PoolEngine(
        experts,
        PoolConfig(max_resident=args.resident, swap="always", policy=policy,
                   overdue_after_ms=args.max_wait_ms),
        EngineConfig(kind="hf", device=args.device, dtype=args.dtype, max_num_seqs=args.batch, max_model_len=512),
    )
    await engine.start()
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    latencies: list[float] = []
    outputs: dict[int, list[int]] = {}

    async def one(i: int, at: float, expert: str, question: str, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        arrived = time.perf_counter()
        req = Dispatch(GenerationRequest(f"q{i}", messages=[ChatMessage(role="user", content=question)],
                                         sampling=sampling), expert=expert)
        out = GenerationOutput.from_deltas([d async for d in engine.stream(req)])
        latencies.append(time.perf_counter() - arrived)
        outputs[i] = out.token_ids

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, at, e, q, t0) for i, (at, e, q) in enumerate(load)))
    makespan = time.perf_counter() - t0
    pool = engine.pool
    expert_bytes = pool.host[next(iter(experts))].nbytes
    await engine.stop()
    tokens = sum(len(v) for v in outputs.values())
    sessions = engine.sessions_served  # engine.sessions keeps only the most recent ones
    return {
        "policy": policy,
        "makespan_s": makespan,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / makespan,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "latency_max_s": max(latencies),
        "expert_bytes": expert_bytes,
        "swaps": pool.stats.swaps,
        "swap_s": pool.stats.swap_s,
        "sessions": sessions,
        "mean_batch": len(outputs) / max(1, sessions),
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--resident", type=int, default=4)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rate", type=float, default=24.0, help="arrivals per second (Poisson)")
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16, help="max_num_seqs: largest batch of one session")
    parser.add_argument("--max-wait-ms", type=float, default=2000)
    parser.add_argument("--policies", default="fcfs,largest_group", help="the first is the baseline of the ratios")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repeats of every policy (order rotated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default swap_sched_<device>)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    rec = RunRecord.start()
    quiet()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    import torch

    args.device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    save_dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device == "cuda" else "float32")
    shape = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(prefix="swap-sched-") as tmp:
        experts = make_experts(Path(tmp), args.experts, shape, save_dtype)
        load = workload(args.requests, sorted(experts), args.zipf, args.rate, args.seed)
        policies = args.policies.split(",")
        by_policy: dict[str, list[dict]] = {p: [] for p in policies}
        for r in range(args.rounds):  # interleaved rounds, order rotated: drift hits every policy alike
            for p in policies[r % len(policies):] + policies[: r % len(policies)]:
                by_policy[p].append(asyncio.run(run_policy(p, experts, args, load)))
    base_p = policies[0]
    first = by_policy[base_p][0]["outputs"]
    for p in policies[1:]:
        same = sum(by_policy[p][0]["outputs"][i] == first[i] for i in first)
        by_policy[p][0]["same_tokens_as_" + base_p] = f"{same}/{len(first)}"
    for runs in by_policy.values():
        for run in runs:
            run.pop("outputs")
    counts: dict[str, int] = {}
    for _, e, _ in load:
        counts[e] = counts.get(e, 0) + 1
    keys = ("tokens_per_s", "latency_p50_s", "latency_p99_s", "swaps", "sessions", "mean_batch", "makespan_s")
    summaries = {p: {k: summary([r[k] for r in runs]) for k in keys} for p, runs in by_policy.items()}
    base_tps = [r["tokens_per_s"] for r in by_policy[base_p]]
    ratios = {
        p: {
            "tokens_per_s": paired_ratio([r["tokens_per_s"] for r in by_policy[p]], base_tps),
            "latency_p50": paired_ratio([r["latency_p50_s"] for r in by_policy[p]],
                                        [r["latency_p50_s"] for r in by_policy[base_p]]),
            "latency_p99": paired_ratio([r["latency_p99_s"] for r in by_policy[p]],
                                        [r["latency_p99_s"] for r in by_policy[base_p]]),
        }
        for p in policies[1:]
    }
    result = rec.finish({
        "benchmark": "swap_sched",
        "device": args.device,
        "dtype": save_dtype,
        "shape": shape.label(),
        "params": shape.params(),
        "args": dict(vars(args)),
        "requests_per_expert": dict(sorted(counts.items())),
        "runs": by_policy,
        "summary": summaries,
        "ratios_vs_" + base_p: ratios,
        "swap_s_per_swap": {p: sum(r["swap_s"] for r in runs) / max(1, sum(r["swaps"] for r in runs))
                            for p, runs in by_policy.items()},
    })
    rows = "\n".join(
        f"| {p} | {fmt(s['tokens_per_s'], digits=1)} | {fmt(s['latency_p50_s'])} | {fmt(s['latency_p99_s'])} | "
        f"{s['swaps']['median']:.0f} | {s['sessions']['median']:.0f} | {s['mean_batch']['median']:.1f} | "
        f"{s['makespan_s']['median']:.1f} |"
        for p, s in summaries.items()
    )
    lines = "\n".join(
        f"- {p} / {base_p}: tokens/s **{fmt(v['tokens_per_s'])}x**, p50 latency {fmt(v['latency_p50'])}x, "
        f"p99 latency {fmt(v['latency_p99'])}x (same greedy tokens: {by_policy[p][0]['same_tokens_as_' + base_p]})"
        for p, v in ratios.items()
    )
    per_swap = ", ".join(f"{p} {1000 * v:.1f} ms" for p, v in result["swap_s_per_swap"].items())
    md = rec.markdown_header(f"Expert-grouped scheduling vs FCFS on one pool ({args.device})") + f"""\
{args.experts} random experts ({shape.label()}, {save_dtype}, \
{by_policy[base_p][0]['expert_bytes'] / 2**20:.0f} MiB each), room for {args.resident} (`swap='always'`); {args.requests} chat requests, Zipf({args.zipf}) \
expert popularity, Poisson arrivals at {args.rate}/s, greedy, {args.max_tokens} new tokens, batch ≤ {args.batch}, \
overdue after {args.max_wait_ms:g} ms; {args.rounds} interleaved round(s) per policy, median [min–max] over rounds. \
Mean time per swap: {per_swap}.

| policy | tokens/s | p50 latency (s) | p99 latency (s) | swaps | sessions | mean batch | makespan (s) |
|---|---|---|---|---|---|---|---|
{rows}

{lines}
"""
    stem = args.name or f"swap_sched_{args.device}"
    js, mdp = write_results(stem, result, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return result


if __name__ == "__main__":
    main()
