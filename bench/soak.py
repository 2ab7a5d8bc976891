"""Memory of an expert replica under sustained traffic (issue #16 item 9), and the pieces the
reliability benchmark shares: the service under test and a recording HTTP client.

    python -m bench.soak [--requests 1000] [--clients 16]

Starts ``coe serve`` on the default config, warms it up, reads the RSS of the
``expert-smollm2`` replica process and of its whole process tree (the engine's helper processes
included), sends N requests that land on that replica (the base model and its two LoRAs,
varied prompt lengths) and reads the RSS again every ``--every`` requests. Reports RSS after
warm-up, after N, and the growth per 1,000 requests (the slope over the second half of the
samples, so a cache that fills once and stays is not counted as a leak) and after the first
``--settle`` requests (the issue #24 target: at most 0.5 MiB per 1,000 for every replica). The
ingress replica's RSS is sampled too.

``--tracemalloc FRAMES`` starts the service with ``COE_TRACEMALLOC=FRAMES`` (replicas trace
their Python heap, serving/deployments/memtrace.py) and, at every sample, asks the expert and
ingress replicas by handle for their heap diff since the previous sample; the diffs go into the
results (``soak.tracemalloc``). Tracing slows the replicas and adds to their RSS: take the RSS
figures from a run without it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "bench-admin-" + os.urandom(6).hex()
SMOLLM2 = ("smollm2", "smollm2-math", "smollm2-code")
PROMPTS = [
    "What is the capital of France?", "Write a short poem about the sea.",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "Write a python function to check whether a number is prime.",
    "Give me three tips for a job interview.", "If 3 apples cost 1.50 dollars, how much do 7 apples cost?",
    "Continue the story. Once upon a time, in a small village by the river,",
    "Complete the sentence. The most important invention of the twentieth century was",
]


class Service:
    """``coe serve`` in a subprocess (own session, fresh COE_HOME with the prepared models)."""

    def __init__(self, port: int, config: str | None = None, startup_s: float = 900,
                 env: dict[str, str] | None = None) -> None:
        from coe.paths import models_dir

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        home = Path(os.environ.get("TMPDIR", "/tmp")) / f"coe-bench-home-{os.getpid()}"
        home.mkdir(exist_ok=True)
        if not (home / "models").exists():
            (home / "models").symlink_to(models_dir())
        env = {**os.environ, "COE_HOME": str(home), "COE_ADMIN_KEY": ADMIN_KEY, "PYTHONUNBUFFERED": "1",
               **(env or {})}
        cmd = [sys.executable, "-m", "coe.tools.cli", "serve", "--port", str(port)] + (["--config", config] if config else [])
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self._up = threading.Event()
        self.serving = False   # "serving at" seen (the output may also end without it: the process exited)
        threading.Thread(target=self._read, daemon=True).start()
        if not self._up.wait(startup_s) or not self.serving or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("coe serve did not come up:\n" + "\n".join(self.lines[-30:]))
        self.startup_s = time.monotonic() - self.t0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if "serving at http://" in line:
                self.serving = True
                self._up.set()
        self._up.set()   # the output ended: the process is exiting

    def tree(self) -> dict[int, float]:
        """pid -> create time of every process under ``coe serve`` now."""
        import psutil

        try:
            return {p.pid: p.create_time() for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            return {}

    def gcs_address(self) -> str:
        """``host:port`` of the GCS of the Ray this ``coe serve`` started (from its command line)."""
        import psutil

        for pid in self.tree():
            try:
                args = psutil.Process(pid).cmdline()
            except psutil.Error:
                continue
            if args and args[0].endswith("/gcs_server"):
                # it picks a free port and writes it into its session folder
                opts = {k.lstrip("-").replace("-", "_"): v for k, v in (a.split("=", 1) for a in args[1:] if "=" in a)}
                port = Path(opts["session_dir"], f"gcs_server_port_{opts['node_id']}").read_text().strip()
                return f"{opts.get('node_ip_address', '127.0.0.1')}:{port}"
        raise RuntimeError("no gcs_server under coe serve: is it a local Ray?")

    @staticmethod
    def left_running(tree: dict[int, float]) -> int:
        """How many processes of ``tree`` still run (same pid and create time, not a zombie)."""
        import psutil

        left = 0
        for pid, created in tree.items():
            try:
                p = psutil.Process(pid)
                left += p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                pass
        return left

    def stop(self, timeout: float = 120) -> dict:
        """SIGINT, wait; returns the exit code and the seconds the stop took."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        return {"exit_code": self.proc.returncode, "stop_s": round(time.monotonic() - t0, 1)}


def stop_on_sigterm() -> None:
    """SIGTERM (e.g. from ``timeout``) unwinds like Ctrl-C, so the service is stopped, not orphaned."""

    def _raise(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_pids(deployment: str = "expert-smollm2", under: int | None = None) -> list[int]:
    """Pids of the Serve replica processes of ``deployment`` (by their Ray process title), only
    those descending from ``under`` (our ``coe serve``) when given: another service may run."""
    import psutil

    if under is not None:
        try:
            ours = {p.pid for p in psutil.Process(under).children(recursive=True)}
        except psutil.Error:
            ours = set()
        return [pid for pid in replica_pids(deployment) if pid in ours]

    tag = f"ServeReplica:coe:{deployment}"
    found = {}
    for p in psutil.process_iter(["cmdline", "ppid"]):
        try:
            if tag in " ".join(p.info["cmdline"] or []):
                found[p.pid] = p.info["ppid"]
        except psutil.Error:
            pass
    # a child that inherited the replica's process title is part of its tree, not another replica
    return [pid for pid, ppid in found.items() if ppid not in found]


def rss_mib(deployment: str = "expert-smollm2", under: int | None = None) -> dict:
    """RSS of the deployment's replica process and of its process tree, MiB (0 when not found)."""
    import psutil

    replica = tree = 0
    parts: dict[str, float] = {}
    for pid in replica_pids(deployment, under):
        try:
            p = psutil.Process(pid)
            replica += p.memory_info().rss
            for q in [p, *p.children(recursive=True)]:
                rss = q.memory_info().rss
                tree += rss
                name = (q.cmdline() or [q.name()])[0].rsplit("/", 1)[-1][:40]
                parts[name] = round(parts.get(name, 0.0) + rss / 2**20, 1)
        except psutil.Error:
            pass
    return {"replica_mib": round(replica / 2**20, 1), "tree_mib": round(tree / 2**20, 1), "by_process_mib": parts}


class ReplicaProbe:
    """Asks replicas for :meth:`memory_diff` by Serve handle, from this process connected to the
    service's Ray as a driver (``bench/soak.py --tracemalloc``)."""

    def __init__(self, address: str, deployments: tuple[str, ...] = ("expert-smollm2", "coe-ingress"),
                 app: str = "coe", limit: int = 15) -> None:
        from coe.tools.ray_local import use_loopback

        use_loopback()  # before `import ray`: the service's Ray listens on 127.0.0.1 only
        # a local Ray started by ray.init() uses token auth (~/.ray/auth_token); a driver that
        # names the address gets it only when asked
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray
        from ray import serve

        ray.init(address=address, log_to_driver=False, namespace="coe-soak")
        self.limit = limit
        self.handles = {d: serve.get_deployment_handle(d, app_name=app) for d in deployments}

    def diffs(self, timeout_s: float = 300) -> dict[str, dict]:
        """Deployment -> its replica's :func:`~coe.serving.deployments.memtrace.memory_report`
        (one replica per deployment in the default config). Blocking: call it in a thread."""
        calls = {d: h.memory_diff.remote(self.limit) for d, h in self.handles.items()}
        return {d: r.result(timeout_s=timeout_s) for d, r in calls.items()}

    @staticmethod
    def close() -> None:
        import ray

        ray.shutdown()


@dataclass
class Call:
    sent: float
    done: float
    status: int | None  # None: no answer (client timeout or connection error)
    expert: str | None = None
    retry_after: str | None = None
    error: str | None = None

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass
class Recorder:
    """Sends chat requests and records every one of them (monotonic clock)."""

    url: str
    timeout_s: float = 60.0
    calls: list[Call] = field(default_factory=list)
    served: ClassVar[Counter] = Counter()  # answers (200) per expert, over every Recorder of the run

    def __post_init__(self) -> None:
        import httpx

        self.client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout_s,
                                        limits=httpx.Limits(max_connections=512, max_keepalive_connections=512))

    async def chat(self, model: str = "coe", prompt: str | None = None, max_tokens: int = 32) -> Call:
        import httpx

        prompt = prompt or random.choice(PROMPTS)
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]}
        t0 = time.monotonic()
        try:
            r = await self.client.post("/v1/chat/completions", json=body)
            call = Call(t0, time.monotonic(), r.status_code, r.headers.get("x-coe-expert"),
                        r.headers.get("retry-after"))
            if r.status_code == 200:
                Recorder.served[call.expert] += 1
        except httpx.TimeoutException:
            call = Call(t0, time.monotonic(), None, error="timeout")
        except httpx.HTTPError as err:
            call = Call(t0, time.monotonic(), None, error=type(err).__name__)
        self.calls.append(call)
        return call

    async def close(self) -> None:
        await self.client.aclose()


async def clients(n: int, until: float, send) -> None:
    """``n`` closed-loop clients calling ``send()`` until the monotonic time ``until``."""

    async def one():
        while time.monotonic() < until:
            await send()

    await asyncio.gather(*(one() for _ in range(n)))


async def soak(url: str, *, requests: int, concurrency: int = 16, every: int = 100, timeout_s: float = 60,
               max_s: float | None = None, under: int | None = None, max_tokens: int = 32,
               long_every: int = 4, settle: int = 1000, probe: ReplicaProbe | None = None) -> dict:
    """RSS of the expert-smollm2 replica (and of the ingress replica) after warm-up and every
    ``every`` requests to it; stops sending after ``max_s`` seconds (then ``requests`` is what
    was sent). Request ``i`` asks for up to ``max_tokens`` (four sizes) and every
    ``long_every``-th prompt is ~400 tokens. With ``probe``, each sample also holds the replicas'
    heap diffs since the previous one (``tracemalloc``)."""
    rec = Recorder(url, timeout_s)
    models = list(SMOLLM2)
    # warm-up: every adapter, a short and a long prompt
    await asyncio.gather(*(rec.chat(models[i % 3], prompt_of(i % 2 * 4 + 1 - i % 2), max_tokens=16) for i in range(6)))
    warm = len(rec.calls)
    until = time.monotonic() + max_s if max_s else float("inf")
    traces: list[dict] = []
    sampling = asyncio.Lock()

    async def sample(i: int) -> dict:
        async with sampling:   # one at a time: a heap diff is taken against the previous one
            if probe is not None:
                traces.append({"requests": i, **await asyncio.to_thread(probe.diffs)})
            return {"requests": i, **rss_mib(under=under), "ingress_mib": rss_mib("coe-ingress", under)["replica_mib"]}

    samples = [await sample(0)]
    sent = 0
    lock = asyncio.Lock()

    async def one():
        nonlocal sent
        while True:
            async with lock:
                if sent >= requests or time.monotonic() > until:
                    return
                sent += 1
                i = sent
            await rec.chat(models[i % 3], prompt_of(i, long_every), max_tokens=max(1, max_tokens * (1 + i % 4) // 4))
            if i % every == 0:
                samples.append(await sample(i))
                print(f"soak: {i} requests, RSS {samples[-1]['replica_mib']} / {samples[-1]['tree_mib']} MiB, "
                      f"ingress {samples[-1]['ingress_mib']} MiB", flush=True)

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    requests = sent
    if max(s["requests"] for s in samples) != requests:
        samples.append(await sample(requests))
    await rec.close()
    ok = sum(1 for c in rec.calls[warm:] if c.status == 200)
    statuses = Counter(str(c.status) for c in rec.calls[warm:])
    out = {"requests": requests, "answered_200": ok, "statuses": dict(statuses),
           "seconds": round(time.monotonic() - t0, 1),
           "samples": sorted(samples, key=lambda s: s["requests"]), **growth(samples, settle)}
    if probe is not None:
        out["tracemalloc"] = traces
    return out


def prompt_of(i: int, long_every: int = 4) -> str:
    """Varied lengths, from one sentence to ~400 tokens (every ``long_every``-th), so the engine's
    KV cache blocks are cycled through as in real traffic."""
    base = random.choice(PROMPTS)
    return base if i % long_every else (base + " Explain your answer in detail, step by step. ") * 20


TARGET_MIB_PER_1000 = 0.5   # issue #24: every replica, after the first 1,000 requests


def growth(samples: list[dict], settle: int = 1000) -> dict:
    """RSS after warm-up and at the end, and the growth per 1,000 requests: over the whole run,
    over its second half and from request ``settle`` on (least-squares slopes), for each of
    ``replica_mib``, ``tree_mib`` and ``ingress_mib`` that every sample has."""
    samples = sorted(samples, key=lambda s: s["requests"])
    keys = [k for k in ("replica_mib", "tree_mib", "ingress_mib") if all(k in s for s in samples)]
    first, last = samples[0], samples[-1]
    n = last["requests"] - first["requests"]

    def slope(points, key):
        if len(points) < 2:
            return None
        xs = [p["requests"] for p in points]
        ys = [p[key] for p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return round(1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den, 2) if den else None

    half = samples[len(samples) // 2:]
    settled = [s for s in samples if s["requests"] >= settle]
    after = {k: slope(settled, k) for k in keys}
    replicas = [after[k] for k in ("replica_mib", "ingress_mib") if k in after]
    return {
        "rss_after_warmup_mib": first, "rss_after_n_mib": last,
        "growth_per_1000_mib": {k: round(1000 * (last[k] - first[k]) / n, 1) if n else None for k in keys},
        "growth_per_1000_second_half_mib": {k: slope(half, k) for k in keys},
        "settle": settle, "growth_per_1000_after_settle_mib": after,
        # the replica processes (expert and ingress); None: too few samples after `settle`
        "target_met": None if None in replicas or not replicas else all(g <= TARGET_MIB_PER_1000 for g in replicas),
    }


def main(argv: list[str] | None = None) -> int:
    from bench.record import RunRecord, write_results
    from coe.serving.deployments.memtrace import ENV, MAX_FRAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--max-s", type=float, default=None, help="stop sending after this many seconds")
    ap.add_argument("--max-tokens", type=int, default=32, help="largest of the four max_tokens sizes")
    ap.add_argument("--long-every", type=int, default=4, help="every N-th prompt is ~400 tokens")
    ap.add_argument("--settle", type=int, default=1000, help="growth is also fitted from this request on")
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help=f"replicas trace their heap with this many frames ({ENV}; 1-{MAX_FRAMES}) and report "
                         "their diff at every sample")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="an environment variable for the service (and its local Ray), e.g. a Ray/Serve setting")
    ap.add_argument("--name", default=None, help="results name (default soak, or soak_tracemalloc when tracing)")
    ap.add_argument("--config", default=None)
    args = ap.parse_args(argv)
    env = dict(e.split("=", 1) for e in args.env)
    if not 0 <= args.tracemalloc <= MAX_FRAMES:
        ap.error(f"--tracemalloc: from 1 to {MAX_FRAMES} frames (0: off)")
    traced = f"; replicas under {ENV}={args.tracemalloc}" if args.tracemalloc else ""
    traced += "".join(f"; {k}={v}" for k, v in env.items())
    rec = RunRecord.start(note="coe serve on the default config; RSS of the expert-smollm2 replica (vLLM) and of "
                               f"the ingress replica{traced}.")
    stop_on_sigterm()
    svc = Service(free_port(), args.config, env={**env, ENV: str(args.tracemalloc)})
    probe = None
    try:
        if args.tracemalloc:
            probe = ReplicaProbe(svc.gcs_address())
        out = asyncio.run(soak(svc.url, requests=args.requests, concurrency=args.clients, every=args.every,
                               max_s=args.max_s, under=svc.proc.pid, max_tokens=args.max_tokens,
                               long_every=args.long_every, settle=args.settle, probe=probe))
    finally:
        if probe is not None:
            probe.close()
        stop = svc.stop()
    data = rec.finish({"soak": out, "startup_s": round(svc.startup_s, 1), "stop": stop})
    md = rec.markdown_header("Soak: memory of the expert-smollm2 and ingress replicas") + soak_markdown(out)
    write_results(args.name or ("soak_tracemalloc" if args.tracemalloc else "soak"), data, md)  # RSS: untraced
    print(md)
    return 0


def soak_markdown(out: dict) -> str:
    a, b = out["rss_after_warmup_mib"], out["rss_after_n_mib"]
    g, h = out["growth_per_1000_mib"], out["growth_per_1000_second_half_mib"]
    ingress = "ingress_mib" in a
    rows = "\n".join(f"| {s['requests']} | {s['replica_mib']} | {s['tree_mib']} |"
                     + (f" {s['ingress_mib']} |" if ingress else "") for s in out["samples"])
    text = (f"{out['requests']} requests ({out['answered_200']} answered 200) in {out['seconds']} s.\n\n"
            f"RSS after warm-up {a['replica_mib']} MiB (replica) / {a['tree_mib']} MiB (tree); after "
            f"{b['requests']} requests {b['replica_mib']} / {b['tree_mib']} MiB. Growth per 1,000 requests: "
            f"{g['replica_mib']} / {g['tree_mib']} MiB over the run, {h['replica_mib']} / {h['tree_mib']} MiB over "
            f"its second half. By process (MiB) after warm-up {a.get('by_process_mib')}, at the end "
            f"{b.get('by_process_mib')}.\n\n")
    if ingress:
        text += f"Ingress replica: {a['ingress_mib']} MiB after warm-up, {b['ingress_mib']} MiB at the end.\n\n"
    after = out.get("growth_per_1000_after_settle_mib")
    if after is not None:
        verdict = {True: "**met**", False: "**not met**", None: "not measured (too few samples after it)"}
        text += (f"Growth per 1,000 requests after the first {out['settle']} (least-squares slope, MiB): "
                 + ", ".join(f"{k.removesuffix('_mib')} {v}" for k, v in after.items())
                 + f". Target (every replica, expert and ingress, at most {TARGET_MIB_PER_1000} MiB per 1,000): "
                 + verdict[out["target_met"]] + ".\n\n")
    text += ("| requests | replica MiB | tree MiB |" + (" ingress MiB |" if ingress else "")
             + "\n|---|---|---|" + ("---|" if ingress else "") + f"\n{rows}\n")
    if out.get("tracemalloc"):
        text += "\n" + tracemalloc_markdown(out["tracemalloc"])
    return text


def tracemalloc_markdown(traces: list[dict], top: int = 5) -> str:
    """Per replica: its traced heap at each sample, and the largest growths over the samples
    after the first (summed by allocation site)."""
    out = []
    for name in [k for k in traces[0] if k != "requests"]:
        heap = ", ".join(f"{t['requests']}: {t[name].get('traced_mib')}" for t in traces)
        sites: Counter = Counter()
        for t in traces[2:]:   # the first diff covers start-up and warm-up
            for st in t[name].get("top", []):
                sites[st["where"]] += st["size_diff_kib"]
        n = traces[-1]["requests"] - traces[1]["requests"] if len(traces) > 2 else 0
        grown = "; ".join(f"`{w.rsplit('site-packages/', 1)[-1]}` {kib:+.1f} KiB" for w, kib in sites.most_common(top))
        out.append(f"- **{name}** traced heap (MiB) by request: {heap}. Largest growth over the last {n} "
                   f"requests: {grown or 'none'}.")
    return "Heap diffs (`tracemalloc`, in the replicas):\n\n" + "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
