"""The service's overhead: the whole service vs the bare engine on the same pre-assigned requests.

Three experts (SmolLM2-135M-Instruct and two LoRA experts on it, one engine as in the default
config). The requests are routed once up front with the real online router; the bare engine then
gets them with those assignments (in process, no HTTP, no Ray), and the service (``build_app``
on Ray Serve, over HTTP, ``model: "coe"`` so it routes each one itself) gets the same requests.

- throughput: completion tokens/s with ``--clients`` concurrent clients (target: service >= 90%
  of bare);
- time to first token, p50, one request at a time, streamed (target: added <= 20 ms).

Both phases run with the same thread settings: ``OMP_NUM_THREADS`` (``--threads``, default 1, what
Ray Serve gives a 1-CPU replica) is set before torch is imported, so this process, its vLLM
workers and the Ray replicas (Ray keeps a value that is already set) all see it, and the hf
engine gets ``cpu_threads`` = ``--threads``. vLLM's CPU workers bind their own OpenMP threads to
the cores they may use, the same way in both phases.

Usage: ``python bench/serve_overhead.py [--engine vllm|hf] [--clients 8] [--repeat 4] [--max-tokens 32] [--threads 1]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_common import QUERIES, expert_loras, machine, percentile, write_results


def build_config(engine: str, loras: dict, root: Path, threads: int):
    import yaml

    from coe.config import parse_config
    from coe.paths import default_config_path

    default = yaml.safe_load(default_config_path().read_text())
    by_id = {e["id"]: e for e in default["experts"]}
    engine_cfg = dict(by_id["smollm2"]["engine"], kind=engine, cpu_threads=threads)
    base = dict(by_id["smollm2"], engine=engine_cfg, resources={"num_cpus": 1})
    experts = [base] + [dict(by_id[eid], adapter=str(path)) for eid, path in loras.items()]
    return parse_config({
        "router": default["router"],
        "experts": experts,
        "serving": {"registry_path": str(root / "registry.sqlite"), "batching": default["serving"]["batching"],
                    "max_tokens_default": 32, "ingress": {"num_cpus": 0.5}},
    })


def workload(config, repeat: int) -> list[tuple[str, str]]:
    """(assigned expert, query) pairs: every query ``repeat`` times, routed by the real router."""
    from coe.routers import build_online_router

    router = build_online_router(config.router, list(config.experts))
    queries = [q for qs in QUERIES.values() for q in qs] * repeat
    return [(d.expert, q) for d, q in zip(router.route(queries), queries)]


async def bare(config, work, args) -> dict:
    from coe.serving.deployments.spec import resolve_model
    from coe.serving.engines import get_engine_class
    from coe.types import ChatMessage, GenerationRequest, SamplingParams

    host = config.experts[0]
    engine = get_engine_class(host.engine.kind)(resolve_model(host.model, None), host.engine)
    await engine.start()
    for e in config.experts[1:]:
        await engine.add_adapter(e.id, e.adapter)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    def req(i, expert, q):
        return GenerationRequest(request_id=str(i), messages=[ChatMessage(role="user", content=q)], sampling=sampling,
                                 adapter=None if expert == host.id else expert, expert=expert)

    await engine.generate(req(0, *work[0]))  # warm-up
    ttft = []
    for i, (expert, q) in enumerate(work[: args.ttft_requests]):
        t0 = time.perf_counter()
        agen = engine.stream(req(i, expert, q))
        await agen.__anext__()
        ttft.append((time.perf_counter() - t0) * 1000)
        async for _ in agen:
            pass
    queue = list(enumerate(work))
    counts: dict[int, int] = {}
    texts: dict[int, str] = {}

    async def client():
        # Await first, then record: ``total += await ...`` reads the total before the await and
        # concurrent clients overwrite each other's updates (the bug that made the first run
        # count 96 tokens for 24 answers of ~28).
        while queue:
            i, (expert, q) = queue.pop(0)
            out = await engine.generate(req(i, expert, q))
            counts[i], texts[i] = out.completion_tokens, out.text

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.clients)))
    wall = time.perf_counter() - t0
    await engine.stop()
    tokens = sum(counts.values())
    return {"tokens": tokens, "requests": len(counts), "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms": ttft, "texts": [texts[i] for i in sorted(texts)]}


async def service(url: str, work, args) -> dict:
    import httpx

    def body(q, stream=False):
        return {"model": "coe", "messages": [{"role": "user", "content": q}], "max_tokens": args.max_tokens,
                "temperature": 0, "stream": stream}

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        r = await c.post("/v1/chat/completions", json=body(work[0][1]))  # warm-up
        r.raise_for_status()
        ttft = []
        for _, q in work[: args.ttft_requests]:
            t0 = time.perf_counter()
            async with c.stream("POST", "/v1/chat/completions", json=body(q, True)) as s:
                first = True
                async for line in s.aiter_lines():
                    if first and line.startswith("data:"):
                        ttft.append((time.perf_counter() - t0) * 1000)
                        first = False
        queue = list(enumerate(work))
        counts: dict[int, int] = {}
        texts: dict[int, str] = {}
        agree = 0

        async def client():
            nonlocal agree
            while queue:
                i, (expert, q) = queue.pop(0)
                r = await c.post("/v1/chat/completions", json=body(q))
                r.raise_for_status()
                data = r.json()
                counts[i], texts[i] = data["usage"]["completion_tokens"], data["choices"][0]["message"]["content"]
                agree += data["model"] == expert

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
    tokens = sum(counts.values())
    return {"tokens": tokens, "requests": len(counts), "wall_s": wall, "tokens_per_s": tokens / wall,
            "ttft_ms": ttft, "routing_agreement": agree / len(work), "texts": [texts[i] for i in sorted(texts)]}


def run_service(config, root: Path, work, args) -> dict:
    import ray
    from ray import serve

    from coe.serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config, base_dir=root), name="coe", route_prefix="/", blocking=False)
        return asyncio.run(service(f"http://127.0.0.1:{port}", work, args))
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ttft-requests", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS for both phases (Ray gives a 1-CPU replica 1) and the hf engine's cpu_threads")
    parser.add_argument("--note", default="2-core CPU development machine; no other benchmark ran at the same time")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported; Ray replicas inherit it
    load_before = os.getloadavg()

    root = Path(tempfile.mkdtemp(prefix="coe-bench-"))
    config = build_config(args.engine, expert_loras(root), root, args.threads)
    work = workload(config, args.repeat)
    b = asyncio.run(bare(config, work, args))
    print("bare", {k: v for k, v in b.items() if k not in ("ttft_ms", "texts")}, flush=True)
    s = run_service(config, root, work, args)
    print("service", {k: v for k, v in s.items() if k not in ("ttft_ms", "texts")}, flush=True)
    same = sum(x == y for x, y in zip(b["texts"], s["texts"]))
    ratio = s["tokens_per_s"] / b["tokens_per_s"]
    ttft_b, ttft_s = percentile(b["ttft_ms"], 50), percentile(s["ttft_ms"], 50)
    m = machine()
    m["note"] = args.note
    m["loadavg_1m_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    md = "\n".join([
        f"# Service overhead ({args.engine} engine)",
        "",
        (f"{len(work)} requests over 3 experts (SmolLM2-135M-Instruct + 2 LoRA experts, one {args.engine} engine), "
         f"greedy, max_tokens {args.max_tokens}, {args.clients} concurrent clients; TTFT: {args.ttft_requests} "
         f"streamed requests one at a time. OMP_NUM_THREADS={args.threads} in both phases. Machine: {m['cpus']} CPUs, "
         f"{m['date']}; {m['note']}; 1-min load average {m['loadavg_1m_before_after'][0]} before, "
         f"{m['loadavg_1m_before_after'][1]} after."),
        "",
        "| | bare engine | service (HTTP, Ray Serve, routing) | ratio / added |",
        "|---|---|---|---|",
        f"| completion tokens (requests) | {b['tokens']} ({b['requests']}) | {s['tokens']} ({s['requests']}) | |",
        f"| completion tokens/s | {b['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | {ratio:.1%} |",
        f"| TTFT p50 (ms) | {ttft_b:.1f} | {ttft_s:.1f} | +{ttft_s - ttft_b:.1f} ms |",
        f"| routed as pre-assigned | | {s['routing_agreement']:.0%} | |",
        f"| identical answers (greedy) | | {same}/{len(work)} | |",
        "",
    ])
    write_results(f"serve_overhead_{args.engine}", {"machine": m, "args": vars(args), "bare": b, "service": s,
                                                    "throughput_ratio": ratio, "ttft_p50_added_ms": ttft_s - ttft_b,
                                                    "identical_answers": same}, md)
    print(json.dumps({"throughput_ratio": ratio, "ttft_added_ms": ttft_s - ttft_b}))


if __name__ == "__main__":
    main()
