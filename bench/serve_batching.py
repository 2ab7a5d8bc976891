"""The batching window vs straight dispatch on the transformers engine (issue #10 item 5).

16 concurrent clients spread over 3 experts (SmolLM2-135M-Instruct + two LoRA experts on it),
each sending requests in a closed loop, against one expert server (the real ``ExpertServer``
with the real ``HFEngine``) in three dispatch modes, measured in one run:

- ``straight``: what the service does for this engine (it declares continuous batching): every
  request goes to the engine at once and joins the running batch at the next decode step;
- ``window``: the batching window forced on (``window_ms`` 10, ``max_batch_size`` 16, one
  ``generate_batch`` per expert per window), what the service does for the mixture engine,
  which runs one batch at a time;
- ``per_request``: the window forced on with batches of one, one at a time — what a server
  without any batching does (the baseline of the ratios).

Usage: ``python bench/serve_batching.py [--clients 16] [--requests-per-client 2] [--max-tokens 16]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_common import QUERIES, expert_loras, machine, write_results

# mode -> (window override for ExpertServer, batching settings)
MODES = {
    "straight": (None, {"max_batch_size": 16, "window_ms": 10.0, "max_concurrent_batches": None}),
    "window": (True, {"max_batch_size": 16, "window_ms": 10.0, "max_concurrent_batches": None}),
    "per_request": (True, {"max_batch_size": 1, "window_ms": 0.0, "max_concurrent_batches": 1}),
}


async def run_mode(spec, window, args) -> dict:
    from coe.serving.deployments.expert_server import ExpertServer
    from coe.types import ChatMessage, GenerationRequest, SamplingParams

    server = ExpertServer(spec, window=window)
    await server.start()
    assert all(v is None for v in server.ready().values()), server.ready()
    experts = list(QUERIES)
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    def request(i: int, j: int) -> GenerationRequest:
        expert = experts[i % len(experts)]
        q = QUERIES[expert][(i // len(experts) + j) % len(QUERIES[expert])]
        return GenerationRequest(request_id=f"{i}-{j}", messages=[ChatMessage(role="user", content=q)],
                                 sampling=sampling, expert=expert)

    await server.generate(request(0, 0))  # warm-up
    batch_sizes: list[int] = []
    tokens = 0

    async def client(i: int) -> None:
        nonlocal tokens
        for j in range(args.requests_per_client):
            served = await server.generate(request(i, j))
            tokens += served.output.completion_tokens
            batch_sizes.append(served.batch_size)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    wall = time.perf_counter() - t0
    await server.stop()
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_batch_size": sum(batch_sizes) / len(batch_sizes), "requests": len(batch_sizes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 = what a 1-CPU Ray Serve replica gets: Ray sets OMP_NUM_THREADS=num_cpus)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from coe.config import BatchingConfig, EngineConfig, LoraExpert, ModelExpert
    from coe.serving.deployments.spec import ServerSpec

    work = Path(tempfile.mkdtemp(prefix="coe-bench-"))
    loras = expert_loras(work)
    host = ModelExpert(id="smollm2", model="smollm2-135m-instruct",
                       engine=EngineConfig(kind="hf", max_model_len=1024, max_num_seqs=args.clients, max_lora_rank=16))
    lora_experts = [LoraExpert(id=eid, base="smollm2", adapter=str(path)) for eid, path in loras.items()]
    results = {}
    for mode in args.modes:
        window, batching = MODES[mode]
        spec = ServerSpec(server_id="expert-smollm2", host=host, loras=lora_experts,
                          batching=BatchingConfig(**batching))
        results[mode] = asyncio.run(run_mode(spec, window, args))
        print(mode, results[mode], flush=True)
    base = results.get("per_request", {}).get("tokens_per_s")
    rows = []
    for mode, r in results.items():
        ratio = r["tokens_per_s"] / base if base else float("nan")
        rows.append(f"| {mode} | {r['tokens_per_s']:.1f} | {r['mean_batch_size']:.1f} | {r['wall_s']:.1f} | {ratio:.2f}x |")
    md = "\n".join([
        "# The batching window vs straight dispatch (transformers engine)",
        "",
        (f"{args.clients} concurrent clients over 3 experts (SmolLM2-135M-Instruct + 2 LoRA experts), "
         f"{args.requests_per_client} requests each, greedy, max_tokens {args.max_tokens}; one ExpertServer + HFEngine "
         f"in process, {args.threads} torch thread(s). Machine: {machine()['cpus']} CPUs, {machine()['date']}; "
         f"{machine()['note']}."),
        "",
        "| dispatch | tokens/s | mean batch | wall s | vs per_request |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    write_results("serve_batching", {"machine": machine(), "args": vars(args), "modes": MODES, "results": results}, md)


if __name__ == "__main__":
    main()
