"""Generation throughput of the two engines on SmolLM2-135M-Instruct, side by side in one run.

For each engine (transformers ``HFEngine``, vLLM ``VLLMEngine``), the same chat prompts, greedy,
``--max-tokens`` new tokens each:

- batch 1: ``--requests`` requests one after another (one sequence in flight);
- batch 16: 16 requests submitted at once (``generate_batch``; the engines batch them).

tokens/s = completion tokens (as counted by the engine, EOS included) / wall time.
Both engines run the same dtype (``--dtype``, default float32) so the figures compare the
engines, not the number formats. Writes ``bench/results/engines_<device><tag>.{json,md}``.

Usage: ``python bench/engines.py [--max-tokens 64] [--requests 4] [--dtype float32] [--engines hf,vllm]``
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Name three colours of the rainbow and describe each one.",
    "Explain what a neural network is in two sentences.",
    "Give me a short recipe for pancakes.",
    "What is 12 times 12? Explain the steps.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
    "List four planets of the solar system.",
    "Translate 'good morning' into French and Spanish.",
    "What does HTTP stand for?",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "How many legs does a spider have?",
    "Suggest a name for a pet cat.",
    "What is the boiling point of water at sea level?",
    "Describe a bicycle to someone who has never seen one.",
]


def machine(device: str) -> dict:
    cpu = ""
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "device": device,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def requests(n: int, max_tokens: int, offset: int = 0):
    from coe.types import ChatMessage, GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [
        GenerationRequest(
            request_id=f"b{i}",
            messages=[ChatMessage(role="user", content=PROMPTS[(i + offset) % len(PROMPTS)])],
            sampling=sampling,
        )
        for i in range(n)
    ]


async def measure(engine_name: str, model: str, args) -> dict:
    from coe.config import EngineConfig
    from coe.serving.engines.base import get_engine_class

    threads = args.hf_cpu_threads if engine_name == "hf" else None
    cfg = EngineConfig(
        kind=engine_name, device=args.device, dtype=args.dtype, max_num_seqs=16, max_model_len=1024, cpu_threads=threads
    )
    engine = get_engine_class(engine_name)(model, cfg)
    t0 = time.perf_counter()
    await engine.start()
    startup = time.perf_counter() - t0
    try:
        await engine.generate_batch(requests(2, 8))  # warm-up
        t0 = time.perf_counter()
        single = [await engine.generate(r) for r in requests(args.requests, args.max_tokens)]
        t1 = time.perf_counter()
        batch = await engine.generate_batch(requests(16, args.max_tokens, offset=args.requests))
        t2 = time.perf_counter()
    finally:
        await engine.stop()
    tok1 = sum(o.completion_tokens for o in single)
    tok16 = sum(o.completion_tokens for o in batch)
    return {
        "engine": engine_name,
        "cpu_threads": threads,
        "startup_s": round(startup, 1),
        "batch1": {"requests": len(single), "tokens": tok1, "seconds": round(t1 - t0, 2), "tokens_per_s": round(tok1 / (t1 - t0), 1)},
        "batch16": {"requests": 16, "tokens": tok16, "seconds": round(t2 - t1, 2), "tokens_per_s": round(tok16 / (t2 - t1), 1)},
        "sample": batch[0].text[:80],
    }


def summary(data: dict) -> str:
    m, rows = data["machine"], data["results"]
    lines = [
        f"# Engines on SmolLM2-135M-Instruct ({data['dtype']}, {m['device']})",
        "",
        (
            f"{m['date']} — {m['cpus']} × {m['cpu'] or 'CPU'}, {m['platform']}; load average at start "
            f"{m['load_average_at_start'][0]:.1f} (shared machine: other work ran at the same time)."
        ),
        f"Greedy, up to {data['max_tokens']} new tokens per request; tokens/s = completion tokens / wall time.",
        "",
        "| engine | torch threads | start-up s | batch 1 tok/s | batch 16 tok/s | batch 16 / batch 1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        gain = r["batch16"]["tokens_per_s"] / r["batch1"]["tokens_per_s"]
        lines.append(
            f"| {r['engine']} | {r.get('cpu_threads') or 'default'} | {r['startup_s']} | {r['batch1']['tokens_per_s']} | {r['batch16']['tokens_per_s']} | {gain:.1f}x |"
        )
    by = {r["engine"]: r for r in rows}
    if {"hf", "vllm"} <= by.keys():
        lines += [
            "",
            (
                f"vllm / hf: batch 1 {by['vllm']['batch1']['tokens_per_s'] / by['hf']['batch1']['tokens_per_s']:.2f}x, "
                f"batch 16 {by['vllm']['batch16']['tokens_per_s'] / by['hf']['batch16']['tokens_per_s']:.2f}x"
            ),
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="sequential requests for batch 1")
    parser.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--hf-cpu-threads", type=int, default=None, help="EngineConfig.cpu_threads for hf")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from coe.config import EngineConfig
    from coe.serving.engines.chat import resolve_device

    device = resolve_device(EngineConfig(device=args.device))
    data = {"machine": machine(device), "dtype": args.dtype, "max_tokens": args.max_tokens, "model": args.model}
    data["results"] = [asyncio.run(measure(name, args.model, args)) for name in args.engines.split(",")]
    md = summary(data)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"engines_{device}{args.tag}.json").write_text(json.dumps(data, indent=2))
    (out / f"engines_{device}{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
