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

from bench.swap_common import PRESETS, machine, make_experts, percentile, quiet, write_results

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
    from coe.types import ChatMessage, GenerationRequest, SamplingParams

    engine = PoolEngine(
        experts,
        PoolConfig(max_resident=args.resident, swap="always", policy=policy, max_wait_ms=args.max_wait_ms),
        EngineConfig(kind="hf", device=args.device, dtype=args.dtype, max_num_seqs=args.batch, max_model_len=512),
    )
    await engine.start()
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    latencies: list[float] = []
    outputs: dict[int, list[int]] = {}

    async def one(i: int, at: float, expert: str, question: str, t0: float) -> None:
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        arrived = time.perf_counter()
        req = GenerationRequest(f"q{i}", messages=[ChatMessage(role="user", content=question)],
                                sampling=sampling, expert=expert)
        out = await engine.generate(req)
        latencies.append(time.perf_counter() - arrived)
        outputs[i] = out.token_ids

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, at, e, q, t0) for i, (at, e, q) in enumerate(load)))
    makespan = time.perf_counter() - t0
    pool = engine.pool
    await engine.stop()
    tokens = sum(len(v) for v in outputs.values())
    sessions = engine.sessions
    return {
        "policy": policy,
        "makespan_s": makespan,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / makespan,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "latency_max_s": max(latencies),
        "swaps": pool.stats.swaps,
        "swap_s": pool.stats.swap_s,
        "sessions": len(sessions),
        "mean_batch": sum(n for _, n in sessions) / max(1, len(sessions)),
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
    parser.add_argument("--policies", default="fcfs,largest_group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default swap_sched_<device>)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
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
        runs = [asyncio.run(run_policy(p, experts, args, load)) for p in args.policies.split(",")]
    base = runs[0]
    for run in runs[1:]:
        same = sum(run["outputs"][i] == base["outputs"][i] for i in base["outputs"])
        run["same_tokens_as_" + base["policy"]] = f"{same}/{len(base['outputs'])}"
    for run in runs:
        run.pop("outputs")
    counts: dict[str, int] = {}
    for _, e, _ in load:
        counts[e] = counts.get(e, 0) + 1
    result = {
        "benchmark": "swap_sched",
        "machine": machine(),
        "device": args.device,
        "dtype": save_dtype,
        "shape": shape.label(),
        "args": {k: v for k, v in vars(args).items()},
        "requests_per_expert": dict(sorted(counts.items())),
        "runs": runs,
        "ratios_vs_" + base["policy"]: {
            r["policy"]: {
                "tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"],
                "latency_p50": r["latency_p50_s"] / base["latency_p50_s"],
                "latency_p99": r["latency_p99_s"] / base["latency_p99_s"],
            }
            for r in runs[1:]
        },
    }
    m = result["machine"]
    rows = "\n".join(
        f"| {r['policy']} | {r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | "
        f"{r['swaps']} | {r['sessions']} | {r['mean_batch']:.1f} | {r['makespan_s']:.1f} |"
        for r in runs
    )
    ratios = "\n".join(
        f"- {p} / {base['policy']}: tokens/s **{v['tokens_per_s']:.2f}x**, p50 latency {v['latency_p50']:.2f}x, "
        f"p99 latency {v['latency_p99']:.2f}x (same greedy tokens: {next(r for r in runs if r['policy'] == p)['same_tokens_as_' + base['policy']]})"
        for p, v in result["ratios_vs_" + base["policy"]].items()
    )
    md = f"""# Expert-grouped scheduling vs FCFS on one pool ({args.device})

{m['date']} · {m['platform']} · {m['cpu_count']} CPUs (load average {m['load_average']}) · torch {m['torch']}\
{' · ' + m['gpu'] if args.device == 'cuda' else ''}

{args.experts} random experts ({shape.label()}, {save_dtype}), room for {args.resident} (`swap='always'`); \
{args.requests} chat requests, Zipf({args.zipf}) expert popularity, Poisson arrivals at {args.rate}/s, \
greedy, {args.max_tokens} new tokens, batch ≤ {args.batch}, max_wait_ms {args.max_wait_ms:g}.

| policy | tokens/s | p50 latency (s) | p99 latency (s) | swaps | sessions | mean batch | makespan (s) |
|---|---|---|---|---|---|---|---|
{rows}

{ratios}
"""
    stem = args.name or f"swap_sched_{args.device}"
    js, mdp = write_results(stem, result, md)
    print(md)
    print(f"wrote {js} and {mdp}")
    return result


if __name__ == "__main__":
    main()
