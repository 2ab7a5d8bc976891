"""Generation throughput of the two engines on SmolLM2-135M-Instruct, side by side in one run.

Fair by construction (issue 14):

- **same threads**: ``--threads N`` (default 1) compute threads for both — the hf engine gets
  ``cpu_threads: N`` (torch intra-op threads) and vLLM's CPU worker gets N OpenMP threads bound
  to cores 0..N-1 (``VLLM_CPU_OMP_THREADS_BIND``; left alone it binds one core fewer than the
  machine has and keeps the last for its scheduler). ``OMP_NUM_THREADS=N`` for the process;
- **same prompts**: the first ``--prompts`` chat prompts; batch 1 sends each once, one after
  another; batch 16 sends the same prompts cycled to 16 requests at once;
- **same adapters enabled**: both engines load the same LoRA (``bench.serve_common.expert_loras``:
  the shipped math expert, else a random rank-8 one) — vLLM always runs with LoRA enabled — and
  ``--use-adapter all`` (default) sends every request through it, ``none`` through the base;
- **interleaved**: both engines are started first, then ``--rounds`` rounds each run batch 1 and
  batch 16 on every engine (order rotated per round); medians and ranges over rounds, and the
  vllm / hf ratio per round.

tokens/s = completion tokens (as counted by the engine, EOS included) / wall time; greedy,
``--max-tokens`` new tokens; the same dtype (``--dtype``, default float32) in both engines.
Writes ``bench/results/engines_<device><tag>.{json,md}``.

Usage: ``python bench/engines.py [--threads 1] [--rounds 3] [--max-tokens 32] [--prompts 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_common import thread_env  # the one place that knows both engines' threads

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Name three colours of the rainbow and describe each one.",
    "Explain what a neural network is in two sentences.",
    "Give me a short recipe for pancakes.",
    "What is 12 times 12? Explain the steps.",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
]
ADAPTER = "bench-lora"


def workloads(n_prompts: int, batch: int = 16) -> dict[str, list[str]]:
    """The prompts of batch 1 (each once) and of batch ``batch`` (the same ones, cycled)."""
    prompts = PROMPTS[:n_prompts]
    return {"batch1": list(prompts), f"batch{batch}": [prompts[i % len(prompts)] for i in range(batch)]}


def requests(prompts: list[str], max_tokens: int, adapter: str | None, tag: str):
    from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    return [
        Dispatch(GenerationRequest(request_id=f"{tag}{i}", messages=[ChatMessage(role="user", content=p)],
                                   sampling=sampling), adapter=adapter)
        for i, p in enumerate(prompts)
    ]


async def answer(engine, dispatch):
    """The whole answer of one engine stream."""
    from coe.types import GenerationOutput

    return GenerationOutput.from_deltas([d async for d in engine.stream(dispatch)])


async def answers(engine, dispatches) -> list:
    """The dispatches sent together (the engine batches them), each one's answer or exception."""
    return list(await asyncio.gather(*(answer(engine, d) for d in dispatches), return_exceptions=True))


async def start_engine(name: str, args, lora: Path):
    from coe.config import EngineConfig
    from coe.serving.engines.base import get_engine_class

    extra = {"cpu_threads": args.threads} if name == "hf" and args.device != "cuda" else {}
    cfg = EngineConfig(kind=name, device=args.device, dtype=args.dtype, max_num_seqs=16, max_model_len=1024, **extra)
    engine = get_engine_class(name)(args.model, cfg)
    t0 = time.perf_counter()
    await engine.start()
    startup = time.perf_counter() - t0
    await engine.add_adapter(ADAPTER, str(lora))
    return engine, startup


async def one_round(engine, loads: dict[str, list[str]], args, tag: str) -> dict:
    adapter = ADAPTER if args.use_adapter == "all" else None
    out = {}
    for wl, prompts in loads.items():
        reqs = requests(prompts, args.max_tokens, adapter, f"{tag}-{wl}-")
        t0 = time.perf_counter()
        if wl == "batch1":
            outs = [await answer(engine, r) for r in reqs]
        else:
            outs = await answers(engine, reqs)
        wall = time.perf_counter() - t0
        errors = [o for o in outs if isinstance(o, Exception)]
        if errors:
            raise errors[0]
        tokens = sum(o.completion_tokens for o in outs)
        out[wl] = {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "texts": [o.text for o in outs]}
        await asyncio.sleep(0.5)  # let OpenMP threads of the finished phase go idle before the next
    return out


async def run(args, lora: Path) -> dict:
    from bench.stats import summary

    names = args.engines.split(",")
    loads = workloads(args.prompts)
    engines = {}
    try:
        for name in names:
            engines[name] = await start_engine(name, args, lora)
        for engine, _ in engines.values():  # warm-up
            await answers(engine, requests(loads["batch1"][:2], 8, ADAPTER, "warm"))
        rounds: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                rounds[name].append(await one_round(engines[name][0], loads, args, f"r{r}"))
    finally:
        for engine, _ in engines.values():
            await engine.stop()
    results = {}
    for name in names:
        results[name] = {
            "startup_s": engines[name][1],
            **{wl: summary([x[wl]["tokens_per_s"] for x in rounds[name]]) for wl in loads},
            "rounds": [{wl: {k: v for k, v in x[wl].items() if k != "texts"} for wl in loads} for x in rounds[name]],
            "sample": rounds[name][0]["batch1"]["texts"][0][:120],
        }
    if {"hf", "vllm"} <= set(names):
        from bench.stats import paired_ratio

        results["vllm_vs_hf"] = {
            wl: paired_ratio([x[wl]["tokens_per_s"] for x in rounds["vllm"]], [x[wl]["tokens_per_s"] for x in rounds["hf"]])
            for wl in loads
        }
        same = sum(a == b for a, b in zip(rounds["vllm"][0]["batch1"]["texts"], rounds["hf"][0]["batch1"]["texts"]))
        results["identical_batch1_answers"] = f"{same}/{len(loads['batch1'])}"
    return results


def summary_md(rec, data: dict, args) -> str:
    from bench.stats import fmt

    res = data["results"]
    names = args.engines.split(",")
    lines = [
        rec.markdown_header(f"Engines on SmolLM2-135M-Instruct ({args.dtype}, {data['device']})").rstrip(),
        "",
        (f"Same {args.threads} compute thread(s) for both engines, the same {args.prompts} prompts for batch 1 "
         f"(one after another) and batch 16 (cycled, at once), the same LoRA loaded in both and "
         f"{'used by every request' if args.use_adapter == 'all' else 'unused (base requests)'}; greedy, up to "
         f"{args.max_tokens} new tokens; {args.rounds} interleaved rounds, median [min–max]; tokens/s = completion "
         f"tokens / wall time."),
        "",
        "| engine | start-up s | batch 1 tok/s | batch 16 tok/s |",
        "|---|---|---|---|",
    ]
    for n in names:
        r = res[n]
        lines.append(f"| {n} | {r['startup_s']:.1f} | {fmt(r['batch1'], digits=1)} | {fmt(r['batch16'], digits=1)} |")
    if "vllm_vs_hf" in res:
        v = res["vllm_vs_hf"]
        lines += ["", (f"vllm / hf per round: batch 1 **{fmt(v['batch1'])}**, batch 16 **{fmt(v['batch16'])}**; "
                       f"identical greedy answers at batch 1: {res['identical_batch1_answers']}.")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1), metavar="N")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="compute threads for each engine (CPU)")
    parser.add_argument("--use-adapter", default="all", choices=["all", "none"])
    parser.add_argument("--dtype", default="float32", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args(argv)

    from bench.record import RunRecord

    rec = RunRecord.start()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    probe = "cuda" if args.device == "cuda" else "cpu"
    os.environ.update(thread_env(args.threads, probe))  # before torch and vLLM are imported

    from bench.record import write_results
    from bench.serve_common import expert_loras
    from coe.config import EngineConfig
    from coe.serving.engines.loading import resolve_device

    device = resolve_device(EngineConfig(device=args.device))
    if device != probe:
        os.environ.update(thread_env(args.threads, device))
    with tempfile.TemporaryDirectory(prefix="engines-bench-") as tmp:
        lora = expert_loras(Path(tmp))["smollm2-math"]
        data = {"device": device, "dtype": args.dtype, "args": vars(args), "adapter": str(lora)}
        data["results"] = asyncio.run(run(args, lora))
    data = rec.finish(data)
    md = summary_md(rec, data, args)
    write_results(f"engines_{device}{args.tag}", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
