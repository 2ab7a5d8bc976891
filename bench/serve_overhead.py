"""The service's overhead: the whole service vs the bare engine on the same pre-assigned requests.

Three experts (SmolLM2-135M-Instruct and two LoRA experts on it, one engine as in the default
config). The requests are routed once up front with the real online router; the bare engine then
gets them with those assignments (in process, no HTTP, no Ray), and the service (``build_app``
on Ray Serve, over HTTP, ``model: "coe"`` so it routes each one itself) gets the same requests.

Both are up at the same time (the bare engine in this process, the service on Ray Serve with
its own engine); requests never overlap between them, and each measured request (or throughput
round) starts ``--settle-s`` (1.2 s) after the other side's last one, so they do not compete for
the cores: vLLM's worker and engine-core processes keep busy-polling their shared-memory queues for
1 s after their last message (``SpinCondition.busy_loop_s`` in vllm's ``shm_broadcast.py``). Without
the pause, the bare engine (this process, nice 0) still polls while the service's engine (a Ray
worker: Ray starts them at nice 15) computes the next request; the reverse costs the bare engine
little, its polling neighbour being at nice 15. ``bench/engine_in_replica.py`` isolates it (QUIET):
the replica's engine hop over the same engine in process was +5.2 ms [+0.1, +13.2] with requests
back to back, +1.5 [-3.4, +4.1] after the pause (17-21 ms in an earlier ad-hoc run with every pair
back to back). Both measured with each model in a vLLM worker process (``engine.cpu_executor: mp``);
with coe's default since (``uni``, ``bench/engine_executor.py``) no worker is polled, and the pause
is kept so that runs compare.

- throughput: completion tokens/s with ``--clients`` concurrent clients over the whole workload,
  ``--rounds`` rounds alternating bare / service (order rotated), the ratio taken per round
  (target: service >= 95% of bare, issue 24);
- time to first token: ``--ttft-pairs`` pairs, each the same query streamed once to the bare
  engine and once to the service (which goes first alternates), ``max_tokens`` 1; the added
  TTFT is the median of the paired differences with a 95% bootstrap interval (target: added
  <= 20 ms: *met* when the interval's upper end is <= 20 ms, *missed* when its lower end is
  above, else *not resolved* — then more pairs are needed).

Both phases run with the same thread settings: ``OMP_NUM_THREADS`` (``--threads``, default 1, what
Ray Serve gives a 1-CPU replica) is set before torch is imported, so this process, its vLLM
workers and the Ray replicas (Ray keeps a value that is already set) all see it, and the hf
engine gets ``cpu_threads`` = ``--threads``. vLLM's CPU workers bind their own OpenMP threads to
the cores they may use, the same way in both phases.

``--hops`` (a diagnosis, not a figure) has every process of the service stamp each hop of a
request (``coe.serving.deployments.hops``) and breaks the service's TTFT down by hop over the TTFT
pairs: the medians of each hop's milliseconds, beside the bare engine's TTFT.

Usage: ``python bench/serve_overhead.py [--engine vllm|hf] [--clients 8] [--repeat 1] [--rounds 2]
[--ttft-pairs 60] [--max-tokens 32] [--threads 1] [--settle-s 1.2] [--hops] [--proxy ray|haproxy]``

``--proxy haproxy`` runs the service with ``serving.proxy: haproxy`` (Serve's HAProxy ingress), and
writes ``serve_overhead_<engine>_haproxy``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import RunRecord, write_results
from bench.serve_common import QUERIES, expert_loras, thread_env
from bench.stats import fmt, paired_ratio, summary


def build_config(engine: str, loras: dict, root: Path, threads: int):
    import yaml

    from coe.config import ENGINE_BACKEND_FIELDS, parse_config
    from coe.paths import default_config_path

    default = yaml.safe_load(default_config_path().read_text())
    by_id = {e["id"]: e for e in default["experts"]}
    other = "vllm" if engine == "hf" else "hf"
    engine_cfg = {k: v for k, v in by_id["smollm2"]["engine"].items() if k not in ENGINE_BACKEND_FIELDS[other]}
    engine_cfg["kind"] = engine
    if engine == "hf":  # vLLM's threads come from VLLM_CPU_OMP_THREADS_BIND (serve_common.thread_env)
        engine_cfg["cpu_threads"] = threads
    base = dict(by_id["smollm2"], engine=engine_cfg, resources={"num_cpus": 1})
    experts = [base] + [dict(by_id[eid], adapter=str(path)) for eid, path in loras.items()]
    return parse_config({
        "router": default["router"],
        "experts": experts,
        "serving": {"registry_path": str(root / "registry.sqlite"), "batching": default["serving"]["batching"],
                    "max_tokens_default": 32, "ingress": {"num_cpus": 0.5}},
    }, base_dir=default_config_path().parent)  # the default router's relative paths (router.fitted)


def workload(config, repeat: int) -> list[tuple[str, str]]:
    """(assigned expert, query) pairs: every query ``repeat`` times, routed by the real router."""
    from coe.routers import build_online_router

    router = build_online_router(config.router, list(config.experts))
    queries = [q for qs in QUERIES.values() for q in qs] * repeat
    return [(d.expert, q) for d, q in zip(router.route(queries), queries)]


TTFT_TARGET_MS = 20.0


class Bare:
    """The bare engine in this process, with the experts' adapters; requests as pre-assigned."""

    def __init__(self, config, args) -> None:
        self.config, self.args = config, args
        self.host = config.experts[0]
        self.engine = None

    async def start(self) -> None:
        from coe.serving.deployments.spec import resolve_model
        from coe.serving.engines import get_engine_class

        self.engine = get_engine_class(self.host.engine.kind)(resolve_model(self.host.model, None), self.host.engine)
        await self.engine.start()
        for e in self.config.experts[1:]:
            await self.engine.add_adapter(e.id, e.adapter)

    def request(self, i, expert, q, max_tokens):
        from coe.types import ChatMessage, Dispatch, GenerationRequest, SamplingParams

        return Dispatch(GenerationRequest(request_id=f"b{i}", messages=[ChatMessage(role="user", content=q)],
                                          sampling=SamplingParams(max_tokens=max_tokens, temperature=0)),
                        adapter=None if expert == self.host.id else expert, expert=expert)

    async def ttft_ms(self, i, expert, q) -> float:
        t0 = time.perf_counter()
        agen = self.engine.stream(self.request(i, expert, q, 1))
        await agen.__anext__()
        ms = (time.perf_counter() - t0) * 1000
        async for _ in agen:
            pass
        return ms

    async def answer(self, i, expert, q) -> tuple[int, str, str]:
        from coe.types import GenerationOutput

        out = GenerationOutput.from_deltas([d async for d in self.engine.stream(self.request(i, expert, q,
                                                                                         self.args.max_tokens))])
        return out.completion_tokens, out.text, expert


class Service:
    """The whole service over HTTP (``model: "coe"``: it routes every request itself)."""

    def __init__(self, client, args) -> None:
        self.c, self.args = client, args
        self.routing_ms: list[float | None] = []   # of each TTFT request (the opening chunk's routing info)
        self.label = "warm"   # the hop stamps' request label: "ttft" once warmed up

    def body(self, q, max_tokens, stream=False):
        return {"model": "coe", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream}

    async def ttft_ms(self, i, expert, q) -> float:
        from coe.serving.deployments.hops import stamp

        rid = f"{self.label}{i}"
        stamp("client.send", rid)
        t0, ms = time.perf_counter(), None
        async with self.c.stream("POST", "/v1/chat/completions", json=self.body(q, 1, True)) as s:
            s.raise_for_status()
            async for line in s.aiter_lines():
                if ms is None and line.startswith("data:"):
                    ms = (time.perf_counter() - t0) * 1000
                    stamp("client.first", rid)
                    if self.label == "ttft":
                        self.routing_ms.append(json.loads(line[5:]).get("coe", {}).get("routing_ms"))
        return ms

    async def answer(self, i, expert, q) -> tuple[int, str, str]:
        r = await self.c.post("/v1/chat/completions", json=self.body(q, self.args.max_tokens))
        r.raise_for_status()
        data = r.json()
        return data["usage"]["completion_tokens"], data["choices"][0]["message"]["content"], data["model"]


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """Per process of this machine: (its title, prefixed ``bench:`` for this process and its
    children, CPU seconds used so far)."""
    import psutil

    me = os.getpid()
    out = {}
    for p in psutil.process_iter(["pid", "ppid", "cmdline", "cpu_times"]):
        info = p.info
        if not info["cmdline"] or info["cpu_times"] is None:
            continue
        title = info["cmdline"][0].split("/")[-1][:48]
        if info["pid"] == me or info["ppid"] == me:
            title = "bench:" + title
        out[info["pid"]] = (title, info["cpu_times"].user + info["cpu_times"].system)
    return out


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per process title between two :func:`cpu_seconds` (more than 0.05 s), most first."""
    used: dict[str, float] = {}
    for pid, (title, t) in after.items():
        if pid in before:
            used[title] = used.get(title, 0.0) + t - before[pid][1]
    return dict(sorted(((k, round(v, 2)) for k, v in used.items() if v > 0.05), key=lambda kv: -kv[1]))


async def throughput(side, work, clients: int, cpu: bool = False) -> dict:
    """Every request of ``work`` through ``clients`` concurrent clients; tokens/s over the wall
    (``cpu``: and the CPU seconds each process of the machine used meanwhile)."""
    before = cpu_seconds() if cpu else None
    queue = list(enumerate(work))
    counts: dict[int, int] = {}
    texts: dict[int, str] = {}
    agree = 0

    async def client():
        nonlocal agree
        while queue:
            i, (expert, q) = queue.pop(0)
            # await first, then record (``total += await ...`` loses updates across clients)
            tokens, text, served_by = await side.answer(i, expert, q)
            counts[i], texts[i] = tokens, text
            agree += served_by == expert

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    tokens = sum(counts.values())
    out = {"tokens": tokens, "requests": len(counts), "wall_s": wall, "tokens_per_s": tokens / wall,
           "expert_agreement": agree / len(work), "texts": [texts[i] for i in sorted(texts)]}
    if cpu:
        out["cpu_s"] = cpu_used(before, cpu_seconds())
    return out


async def measure(config, url: str, work, args) -> dict:
    import httpx

    bare = Bare(config, args)
    await bare.start()
    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            service = Service(c, args)
            sides = {"bare": bare, "service": service}
            for side in sides.values():  # warm-up
                await side.answer(0, *work[0])
                await side.ttft_ms(0, *work[0])
            service.label = "ttft"
            rounds: dict[str, list[dict]] = {"bare": [], "service": []}
            for r in range(args.rounds):
                for name in (["bare", "service"] if r % 2 == 0 else ["service", "bare"]):
                    await asyncio.sleep(args.settle_s)   # the other side's engine has stopped polling
                    rounds[name].append(await throughput(sides[name], work, args.clients, cpu=args.hops))
                    print(name, {k: v for k, v in rounds[name][-1].items() if k != "texts"}, flush=True)
            ttft: dict[str, list[float]] = {"bare": [], "service": []}
            for i in range(args.ttft_pairs):
                expert, q = work[i % len(work)]
                for name in (["bare", "service"] if i % 2 == 0 else ["service", "bare"]):
                    await asyncio.sleep(args.settle_s)
                    ttft[name].append(await sides[name].ttft_ms(i, expert, q))
    finally:
        await bare.engine.stop()
    return {"rounds": rounds, "ttft_ms": ttft, "routing_ms": service.routing_ms}


# (name, from stage, to stage) of each hop of a streamed request, in order (see serving/deployments/hops.py)
HOPS = [
    ("proxy: client -> ingress replica", "client.send", "ingress.enter"),
    ("ingress: ASGI, body parse/validate", "ingress.enter", "route.enter"),
    ("ingress: checks, routing, admission, dispatch", "route.enter", "backend.call"),
    ("handle call -> expert replica", "backend.call", "replica.enter"),
    ("expert server: prepare (tokenize)", "replica.enter", "server.prepared"),
    ("engine: first token", "server.prepared", "server.first"),
    ("stream item: replica -> ingress", "server.first", "backend.first"),
    ("ingress: EventStream, response", "backend.first", "route.response"),
    ("ingress: first SSE body handed to Serve", "route.response", "ingress.first_body"),
    ("proxy: ingress -> client", "ingress.first_body", "client.first"),
]


def hop_breakdown(stamps, routing_ms: list) -> dict:
    """Per hop, the summary of its milliseconds over the TTFT requests: each request is the
    window between its ``client.send`` and ``client.first`` stamps, and a hop's ends are the first
    stamps of its stages in that window (the requests of the TTFT phase run one at a time)."""
    sends = [(t, rid) for t, _, stage, rid in stamps if stage == "client.send" and rid.startswith("ttft")]
    firsts = {rid: t for t, _, stage, rid in stamps if stage == "client.first"}
    per_hop: dict[str, list[float]] = {name: [] for name, _, _ in HOPS}
    total: list[float] = []
    for t0, rid in sends:
        t1 = firsts.get(rid)
        if t1 is None:
            continue
        seen: dict[str, float] = {"client.send": t0, "client.first": t1}
        for t, _, stage, _ in stamps:
            if t0 <= t <= t1 and stage not in seen:
                seen[stage] = t
        if not all(a in seen and b in seen for _, a, b in HOPS):
            continue
        for name, a, b in HOPS:
            per_hop[name].append((seen[b] - seen[a]) * 1000)
        total.append((t1 - t0) * 1000)
    out = {name: summary(v) for name, v in per_hop.items()}
    out["routing_ms (inside the routing hop)"] = summary([r for r in routing_ms if r is not None])
    out["total"] = summary(total)
    return out


def stream_items(stamps) -> float | None:
    """The mean number of stream items (replica -> ingress) per answer before the TTFT phase (the
    throughput rounds): ``backend.first`` and ``backend.item`` stamps per request id."""
    start = min((t for t, _, stage, rid in stamps if stage == "client.send" and rid.startswith("ttft")),
                default=float("inf"))
    items: dict[str, int] = {}
    for t, _, stage, rid in stamps:
        if t < start and stage in ("backend.first", "backend.item"):
            items[rid] = items.get(rid, 0) + 1
    return sum(items.values()) / len(items) if items else None


def run_service(config, root: Path, work, args) -> dict:
    import ray
    from ray import serve

    from coe.serving.app import build_app
    from coe.serving.deployments import hops
    from coe.serving.deployments.spec import private_haproxy_dir, proxy_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.hops:
        os.environ[hops.ENV] = str(root / "hops.txt")   # before Ray starts: its workers inherit it
    private = private_haproxy_dir() if args.proxy == "haproxy" else None
    for key, value in proxy_env(args.proxy, private).items():   # Serve's proxy as `coe serve` starts it
        os.environ.setdefault(key, value)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config, base_dir=root), name="coe", route_prefix="/", blocking=False)
        m = asyncio.run(measure(config, f"http://127.0.0.1:{port}", work, args))
    finally:
        serve.shutdown()
        ray.shutdown()
        if private:
            shutil.rmtree(private, ignore_errors=True)
    if args.hops:
        stamps = hops.read(os.environ.pop(hops.ENV))
        m["hops"] = hop_breakdown(stamps, m["routing_ms"])
        m["stream_items_per_answer"] = stream_items(stamps)
    return m


def hop_table(hops: dict | None, bare: dict, items: float | None = None) -> list[str]:
    """The markdown lines of ``--hops``'s breakdown (none without it)."""
    if not hops:
        return []
    lines = [("Service TTFT by hop (`--hops`: every hop stamped, a diagnosis, not a figure); ms, median "
              "[IQR] over the TTFT requests:"), "", "| hop | ms |", "|---|---|"]
    for name, s in hops.items():
        if s.get("n"):
            lines.append(f"| {name} | {s['median']:.1f} [{s['iqr'][0]:.1f}–{s['iqr'][1]:.1f}] |")
    lines.append(f"| (bare engine TTFT) | {bare['median']:.1f} [{bare['iqr'][0]:.1f}–{bare['iqr'][1]:.1f}] |")
    if items is not None:
        lines += ["", f"Stream items replica -> ingress per answer in the throughput rounds: {items:.1f}."]
    return lines + [""]


def verdict(ci: list[float], target: float) -> str:
    if ci[1] <= target:
        return "met"
    if ci[0] > target:
        return "missed"
    return "not resolved"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="every query this many times per throughput round")
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds, alternating bare / service")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ttft-pairs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1,
                        help="compute threads for both phases' engine (Ray gives a 1-CPU replica 1)")
    parser.add_argument("--settle-s", type=float, default=1.2,
                        help="idle seconds before each measured request or round (vLLM's queues poll 1 s)")
    parser.add_argument("--proxy", choices=["ray", "haproxy"], default="ray",
                        help="what takes the service's HTTP connections (serving.proxy)")
    parser.add_argument("--note", default="2-core CPU development machine")
    parser.add_argument("--hops", action="store_true",
                        help="break the service's TTFT down by hop and count each process's CPU seconds in the "
                             "throughput rounds (a diagnosis: stamps cost a write each)")
    args = parser.parse_args(argv)
    rec = RunRecord.start(note=args.note)
    os.environ.update(thread_env(args.threads))  # before torch / vLLM are imported; Ray replicas inherit it

    root = Path(tempfile.mkdtemp(prefix="coe-bench-"))
    config = build_config(args.engine, expert_loras(root), root, args.threads)
    work = workload(config, args.repeat)
    m = run_service(config, root, work, args)
    rounds, ttft = m["rounds"], m["ttft_ms"]
    tps = {k: summary([r["tokens_per_s"] for r in v]) for k, v in rounds.items()}
    ratio = paired_ratio([r["tokens_per_s"] for r in rounds["service"]], [r["tokens_per_s"] for r in rounds["bare"]])
    added = summary([s - b for s, b in zip(ttft["service"], ttft["bare"])])
    ttft_s = {k: summary(v) for k, v in ttft.items()}
    same = sum(x == y for x, y in zip(rounds["bare"][0]["texts"], rounds["service"][0]["texts"]))
    status = verdict(added["ci"], TTFT_TARGET_MS)
    data = rec.finish({
        "benchmark": "serve_overhead", "args": vars(args), "work": work, "rounds": rounds, "ttft_ms": ttft,
        "tokens_per_s": tps, "throughput_ratio": ratio, "ttft": ttft_s, "ttft_added_ms": added,
        "ttft_target": {"added_ms_max": TTFT_TARGET_MS, "status": status}, "identical_answers": same,
        "routing_agreement": rounds["service"][0]["expert_agreement"], "hops": m.get("hops"),
        "stream_items_per_answer": m.get("stream_items_per_answer"),
    })
    proxy = "" if args.proxy == "ray" else f", serving.proxy {args.proxy}"
    md = rec.markdown_header(f"Service overhead ({args.engine} engine{proxy})") + "\n".join([
        (f"{len(work)} requests over 3 experts (SmolLM2-135M-Instruct + 2 LoRA experts, one {args.engine} engine), "
         f"greedy, max_tokens {args.max_tokens}, {args.clients} concurrent clients, {args.rounds} throughput rounds "
         f"alternating bare / service; TTFT: {args.ttft_pairs} pairs (same query to both, one at a time, streamed, "
         f"max_tokens 1, order alternating), each request or round {args.settle_s:g} s after the other side's last "
         f"(vLLM polls its queues for 1 s after a request). {args.threads} compute thread(s) in both. "
         f"Median [min–max]; the added TTFT's interval is a 95% bootstrap CI of the median paired difference."),
        "",
        "| | bare engine | service (HTTP, Ray Serve, routing) | ratio / added |",
        "|---|---|---|---|",
        (f"| completion tokens/s | {fmt(tps['bare'], digits=1)} | {fmt(tps['service'], digits=1)} | "
         f"{fmt(ratio)} (target ≥ 0.95) |"),
        (f"| TTFT (ms) | {fmt(ttft_s['bare'], digits=1)} | {fmt(ttft_s['service'], digits=1)} | "
         f"+{added['median']:.1f} ms, 95% CI [{added['ci'][0]:.1f}, {added['ci'][1]:.1f}] — {status} (target ≤ 20 ms) |"),
        f"| routed as pre-assigned | | {data['routing_agreement']:.0%} | |",
        f"| identical answers (greedy, round 1) | | {same}/{len(work)} | |",
        "",
        *hop_table(m.get("hops"), ttft_s["bare"], m.get("stream_items_per_answer")),
    ])
    write_results(f"serve_overhead_{args.engine}" + ("" if args.proxy == "ray" else f"_{args.proxy}"), data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
