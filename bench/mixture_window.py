"""The batching window on the mixture engine vs direct dispatch, same requests, interleaved.

The mixture engine (``coe.serving.engines.mixture``) runs one batch at a time. Two ways to feed
it ``--clients`` concurrent clients (closed loop: each sends its next request when the last is
answered, ``--per-client`` requests each):

- ``direct``: the engine's window holds one request (``max_batch_size`` 1, 0 ms: a batch of one
  each; the engine runs them one after another);
- ``window_<ms>``: the engine's batching window (``MixtureEngine.set_window``: ``<ms>``,
  ``max_batch_size`` = ``--batch``, one batch at a time); requests keep collecting while a batch
  runs.

Reported per mode (median [min–max] over ``--rounds`` interleaved rounds, order rotated):
completion tokens/s over the wall time, latency p50 / p99, mean batch; and the ratio to
``direct`` per round. Greedy decoding: the answers must not depend on the mode (checked).

Model: SmolLM2-135M-Instruct with the shipped math and code LoRA experts as a uniform MoLE
(``--preset smollm2``, needs ``coe models prepare``), or a random ``--preset tiny`` llama with
two random LoRAs (tests, dry runs).

Run: ``python bench/mixture_window.py [--clients 8 --per-client 2 --max-tokens 16 --rounds 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "What is 15 percent of 80?",
    "Write a python function to reverse a string.",
    "How far does a train at 60 miles per hour go in 3 hours?",
    "Write a function that counts vowels.",
    "What is 12 times 7?",
    "Write a python function to check whether a number is prime.",
    "Tom has 12 marbles and gives away a third. How many are left?",
    "Write a function to find the maximum of three numbers.",
]


def model_and_adapters(preset: str, work: Path) -> tuple[str, list[tuple[str, str]]]:
    """The base model folder and ``[(name, lora folder)]`` for ``preset``."""
    if preset == "smollm2":
        from coe.model_paths import resolve

        experts = Path(__file__).resolve().parents[1] / "adapters" / "experts"
        return str(resolve("smollm2-135m-instruct")), [(n, str(experts / n)) for n in ("math", "code")]
    from bench.lora_common import random_loras
    from bench.swap_common import PRESETS, make_experts

    base = Path(make_experts(work, 1, PRESETS[preset], "float32")["expert00"])
    loras = random_loras(base, work, 2, rank=8, targets=["q_proj", "v_proj"])
    return str(base), [(f"l{i}", str(p)) for i, p in enumerate(loras)]


async def one_mode(engine, mode: str, args) -> dict:
    from bench.stats import percentile
    from coe.config import BatchingConfig
    from coe.types import ChatMessage, Dispatch, GenerationOutput, GenerationRequest, SamplingParams

    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    direct = mode == "direct"
    engine.set_window(BatchingConfig(max_batch_size=1 if direct else args.batch,
                                     window_ms=0 if direct else float(mode.split("_")[1])))
    latencies, answers, tokens = [], {}, []

    async def client(c: int) -> None:
        for k in range(args.per_client):
            i = c * args.per_client + k
            req = Dispatch(GenerationRequest(f"{mode}-{i}", sampling=sampling, messages=[
                ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])]))
            t0 = time.perf_counter()
            out = GenerationOutput.from_deltas([delta async for delta in engine.stream(req)])
            latencies.append(time.perf_counter() - t0)
            answers[i] = out.text
            tokens.append(out.completion_tokens)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(client(c) for c in range(args.clients)))
    finally:
        await engine.window.close()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "requests": len(answers), "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99), "mean_batch": len(answers) / max(1, engine.window.batches_dispatched),
            "answers": [answers[i] for i in sorted(answers)]}


async def run(args, model: str, adapters) -> dict[str, list[dict]]:
    from coe.config import EngineConfig
    from coe.serving.engines.mixture import MixtureEngine

    extra = {"cpu_threads": args.threads} if args.threads else {}
    engine = MixtureEngine(model, EngineConfig(kind="hf", device="cpu", dtype="float32", max_num_seqs=args.batch,
                                               **extra), method="mole", adapters=adapters)
    await engine.start()
    modes = ["direct", *(f"window_{w:g}" for w in args.windows)]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    try:
        await one_mode(engine, "direct", argparse.Namespace(**{**vars(args), "clients": 1, "per_client": 1}))
        for r in range(args.rounds):
            for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                runs[mode].append(await one_mode(engine, mode, args))
    finally:
        await engine.stop()
    return runs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smollm2", choices=["smollm2", "tiny", "small"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--batch", type=int, default=8, help="max_batch_size of the window")
    p.add_argument("--windows", type=float, nargs="+", default=[10.0, 50.0], help="window lengths in ms")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    p.add_argument("--name", default="mixture_window_cpu")
    args = p.parse_args(argv)

    from bench.record import RunRecord, write_results

    rec = RunRecord.start()
    from bench.stats import fmt, paired_ratio, summary
    from bench.swap_common import quiet

    quiet()
    with tempfile.TemporaryDirectory(prefix="mixture-window-") as tmp:
        model, adapters = model_and_adapters(args.preset, Path(tmp))
        runs = asyncio.run(run(args, model, adapters))
    base = runs["direct"]
    same = all(run["answers"] == base[0]["answers"] for rs in runs.values() for run in rs)
    tput = {m: summary([r["tokens_per_s"] for r in rs]) for m, rs in runs.items()}
    ratios = {m: paired_ratio([b["wall_s"] for b in base], [r["wall_s"] for r in rs]) for m, rs in runs.items()
              if m != "direct"}
    for rs in runs.values():
        for r in rs:
            r.pop("answers")
    data = rec.finish({
        "benchmark": "mixture_window", "args": vars(args), "model": model, "adapters": adapters, "runs": runs,
        "tokens_per_s": tput, "speedup_vs_direct": ratios, "same_answers_in_every_mode": same,
        "latency_p50_s": {m: summary([r["latency_p50_s"] for r in rs]) for m, rs in runs.items()},
        "mean_batch": {m: summary([r["mean_batch"] for r in rs]) for m, rs in runs.items()},
    })
    rows = "\n".join(
        f"| {m} | {fmt(tput[m])} | {fmt(data['latency_p50_s'][m])} | "
        f"{fmt(summary([r['latency_p99_s'] for r in rs]))} | {data['mean_batch'][m]['median']:.1f} | "
        f"{'1.00' if m == 'direct' else fmt(ratios[m])} |"
        for m, rs in runs.items()
    )
    md = rec.markdown_header("Batching window vs direct dispatch on the mixture engine (cpu)") + (
        f"Uniform MoLE over {len(adapters)} LoRA experts on {Path(model).name} ({args.preset}); {args.clients} "
        f"closed-loop clients × {args.per_client} requests, greedy, {args.max_tokens} new tokens, window batch ≤ "
        f"{args.batch}; {args.rounds} interleaved rounds, median [min–max]; speed-up = direct wall / mode wall per "
        f"round (same requests). Same answers in every mode: {same}.\n\n"
        f"| mode | tokens/s | p50 latency (s) | p99 latency (s) | mean batch | speed-up vs direct |\n"
        f"|---|---|---|---|---|---|\n{rows}\n"
    )
    write_results(args.name, data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
