"""Reliability of the service (issue #16 "Measure"): load, a burst, a killed replica, memory
growth, and fuzzing over the OpenAPI, on the default config, through ``coe serve``.

    python -m bench.reliability [--load-s 45] [--phases load,burst,soak,fuzz,kill]

Phases (in this order, on one service start):

* load: ``--load-clients`` closed-loop clients (routed chat, 32 tokens) for ``--load-s``:
  p50/p99 latency, the share of requests answered 200, statuses, client timeouts.
* burst: ``--burst`` requests at once, each with a ``--burst-deadline-s`` client deadline:
  whether every one got 200, or 429/503 with ``Retry-After``, within the deadline.
* soak: RSS of the expert-smollm2 replica after warm-up and after ``--soak-requests`` requests
  to it; growth per 1,000 requests (``bench/soak.py``).
* fuzz: schemathesis over ``/openapi.json`` (``--fuzz-examples`` cases per operation, no admin
  key): requests sent and 5xx answers.
* kill: ``--kill-clients`` clients (half pinned to smollm2, half routed) while the expert-smollm2
  replica is killed with SIGKILL: requests lost (in flight at the kill, not answered 200), time
  to the first fast failure (an answer other than a 200 from smollm2 after the kill), time until
  smollm2 answers 200 again, and how long /readyz said not ready.

Results: ``bench/results/reliability.{json,md}`` with the machine, date and load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.soak import (
    PROMPTS,
    SMOLLM2,
    Recorder,
    Service,
    clients,
    free_port,
    growth,
    replica_pids,
    soak,
    soak_markdown,
    stop_on_sigterm,
)

PHASES = ("load", "burst", "soak", "fuzz", "kill")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 2)


def statuses(calls) -> dict:
    return dict(Counter(str(c.status if c.status is not None else c.error) for c in calls))


async def load_phase(url: str, n: int, seconds: float, timeout_s: float) -> dict:
    rec = Recorder(url, timeout_s)
    t0 = time.monotonic()
    await clients(n, t0 + seconds, rec.chat)
    await rec.close()
    calls = rec.calls
    ok = [c.latency for c in calls if c.status == 200]
    return {"clients": n, "seconds": round(time.monotonic() - t0, 1), "requests": len(calls),
            "answered_200": len(ok), "share_answered": round(len(ok) / len(calls), 3) if calls else None,
            "p50_s": pct(ok, 0.5), "p99_s": pct(ok, 0.99), "p50_all_s": pct([c.latency for c in calls], 0.5),
            "statuses": statuses(calls), "no_answer": sum(1 for c in calls if c.status is None),
            "throughput_rps": round(len(ok) / seconds, 2)}


async def burst_phase(url: str, n: int, deadline_s: float) -> dict:
    rec = Recorder(url, deadline_s)
    t0 = time.monotonic()
    await asyncio.gather(*(rec.chat() for _ in range(n)))
    await rec.close()
    calls = rec.calls
    good = [c for c in calls if c.status == 200 or (c.status in (429, 503) and c.retry_after is not None)]
    return {"requests": n, "deadline_s": deadline_s, "seconds": round(time.monotonic() - t0, 1),
            "statuses": statuses(calls), "answered_ok_or_retry_after": len(good),
            "all_answered_within_deadline": len(good) == n and all(c.latency <= deadline_s for c in calls),
            "max_latency_s": round(max(c.latency for c in calls), 2), "p50_s": pct([c.latency for c in calls], 0.5),
            "rejected_with_retry_after": sum(1 for c in calls if c.status in (429, 503) and c.retry_after),
            "rejected_without_retry_after": sum(1 for c in calls if c.status in (429, 503) and not c.retry_after),
            "no_answer": sum(1 for c in calls if c.status is None)}


def fuzz_phase(url: str, examples: int, max_s: float) -> dict:
    """schemathesis over the OpenAPI; counts the requests and 5xx answers from its HAR log."""
    exe = Path(sys.executable).with_name("st")
    if not exe.exists():
        return {"skipped": "schemathesis is not installed (pip install -e '.[bench]')"}
    with tempfile.TemporaryDirectory() as tmp:
        har = Path(tmp) / "run.har"
        cmd = [str(exe), "run", f"{url}/openapi.json", "--max-examples", str(examples), "--workers", "2",
               "--request-timeout", "60", "--report", "har", "--report-har-path", str(har), "--no-color",
               "--checks", "not_a_server_error", "--seed", "16"]
        t0 = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=max_s, check=False)
            tail, timed_out = out.stdout[-1500:], False
        except subprocess.TimeoutExpired as err:
            tail, timed_out = (err.stdout or b"")[-1500:].decode(errors="replace"), True
        entries, har_error = read_har(har)
    codes = Counter(e["response"]["status"] for e in entries)
    fivexx = {str(k): v for k, v in codes.items() if k >= 500}
    return {"requests": len(entries), "statuses": {str(k): v for k, v in sorted(codes.items())},
            "5xx": sum(fivexx.values()), "5xx_by_status": fivexx, "seconds": round(time.monotonic() - t0, 1),
            "stopped_at_time_limit": timed_out, "examples_per_operation": examples, "summary_tail": tail[-600:],
            **({"har_unreadable": har_error} if har_error else {})}


def read_har(har: Path) -> tuple[list, str | None]:
    """The entries of schemathesis's HAR log, and why it could not be read (a run stopped at its
    time limit may leave it half-written): then the counts are over no entries and say so."""
    if not har.exists():
        return [], "no HAR log was written"
    try:
        return json.loads(har.read_text())["log"]["entries"], None
    except (ValueError, KeyError) as err:
        return [], f"{type(err).__name__}: {str(err)[:120]}"


async def kill_phase(url: str, n: int, max_s: float, timeout_s: float, before_s: float = 10,
                     under: int | None = None) -> dict:
    import httpx

    rec = Recorder(url, timeout_s)
    pinned = lambda: rec.chat("smollm2", random.choice(PROMPTS), max_tokens=16)
    routed = lambda: rec.chat("coe", random.choice(PROMPTS[:4]), max_tokens=16)
    t0 = time.monotonic()
    state = {"kill": None, "recovered": None}
    ready: list[tuple[float, int]] = []

    async def readiness():
        async with httpx.AsyncClient(base_url=url, timeout=5) as c:
            while time.monotonic() < t0 + max_s and state["recovered"] is None:
                try:
                    ready.append((time.monotonic(), (await c.get("/readyz")).status_code))
                except httpx.HTTPError:
                    ready.append((time.monotonic(), 0))
                await asyncio.sleep(1)

    async def killer():
        await asyncio.sleep(before_s)
        pids = replica_pids("expert-smollm2", under)
        state["kill"] = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        state["pids"] = pids

    async def client(send):
        while time.monotonic() < t0 + max_s:
            call = await send()
            k = state["kill"]
            if k is not None and call.sent > k and call.status == 200 and call.expert in SMOLLM2 \
                    and state["recovered"] is None:
                state["recovered"] = call.done
            if state["recovered"] is not None and time.monotonic() > state["recovered"] + 5:
                return

    await asyncio.gather(killer(), readiness(), *(client(pinned if i % 2 else routed) for i in range(n)))
    await rec.close()
    k = state["kill"]
    calls = rec.calls
    in_flight = [c for c in calls if c.sent < k < c.done]
    after = sorted((c for c in calls if c.sent >= k), key=lambda c: c.done)
    not_smollm2 = [c for c in after if not (c.status == 200 and c.expert in SMOLLM2)]
    fast = not_smollm2[0] if not_smollm2 else None
    down = [t for t, s in ready if t >= k and s != 200]
    before_recovery = [c for c in after if state["recovered"] is None or c.sent < state["recovered"]]
    return {
        "clients": n, "killed_pids": state.get("pids"),
        "in_flight_at_kill": len(in_flight), "lost": sum(1 for c in in_flight if c.status != 200),
        "time_to_first_fast_answer_s": round(fast.done - k, 2) if fast else None,
        "first_fast_answer": {"status": fast.status, "expert": fast.expert, "latency_s": round(fast.latency, 2),
                              "retry_after": fast.retry_after} if fast else None,
        "during_outage": {"requests": len(before_recovery), "statuses": statuses(before_recovery),
                          "served_by": dict(Counter(c.expert for c in before_recovery if c.status == 200)),
                          "p50_latency_s": pct([c.latency for c in before_recovery], 0.5),
                          "max_latency_s": pct([c.latency for c in before_recovery], 1.0),
                          "no_answer": sum(1 for c in before_recovery if c.status is None)},
        "time_to_recover_s": round(state["recovered"] - k, 1) if state["recovered"] else None,
        "readyz_not_ready_s": round(down[-1] - down[0] + 1, 1) if down else 0.0,
        "gave_up_after_s": None if state["recovered"] else max_s,
    }


async def run_phases(svc: Service, args, out: dict) -> dict:
    """Run the phases, filling ``out`` as each one ends (so an interrupted run keeps them)."""
    from bench.soak import rss_mib
    warm = Recorder(svc.url, 120)
    await asyncio.gather(*(warm.chat(m) for m in ("coe", "smollm2", "gemma3", "smollm2-math") for _ in range(2)))
    await warm.close()
    out["warmup_statuses"] = statuses(warm.calls)
    memory = []  # RSS of the expert-smollm2 replica after each phase, against the requests it answered

    def sample(phase: str) -> None:
        memory.append({"phase": phase, "requests": sum(Recorder.served[e] for e in SMOLLM2), **rss_mib(under=svc.proc.pid)})
        out["memory"] = {"samples": memory, **growth(memory)}

    sample("warm-up")
    if "load" in args.phases:
        out["load"] = await load_phase(svc.url, args.load_clients, args.load_s, args.client_timeout_s)
        print("load", out["load"], flush=True)
        sample("load")
    if "burst" in args.phases:
        out["burst"] = await burst_phase(svc.url, args.burst, args.burst_deadline_s)
        print("burst", out["burst"], flush=True)
        sample("burst")
    if "soak" in args.phases:
        out["soak"] = await soak(svc.url, requests=args.soak_requests, every=max(1, args.soak_requests // 5),
                                 max_s=args.soak_max_s, under=svc.proc.pid)
        print("soak", {k: v for k, v in out["soak"].items() if k != "samples"}, flush=True)
        sample("soak")
    if "fuzz" in args.phases:
        out["fuzz"] = await asyncio.to_thread(fuzz_phase, svc.url, args.fuzz_examples, args.fuzz_max_s)
        print("fuzz", {k: v for k, v in out["fuzz"].items() if k != "summary_tail"}, flush=True)
        sample("fuzz")
    if "kill" in args.phases:
        out["kill"] = await kill_phase(svc.url, args.kill_clients, args.kill_max_s, args.client_timeout_s,
                                        under=svc.proc.pid)
        print("kill", out["kill"], flush=True)
    return out


def markdown(r: dict) -> str:
    lines = [f"Service start {r['startup_s']} s; stop {r['stop']}."
             + (" **Interrupted**: only the phases below finished." if r.get("interrupted") else "")
             + (f" Error: {r['error']}." if r.get("error") else "")]
    if "load" in r:
        x = r["load"]
        lines.append(f"\n## Load: {x['clients']} clients for {x['seconds']} s\n\n{x['requests']} requests, "
                     f"{x['share_answered']:.1%} answered 200; p50 {x['p50_s']} s, p99 {x['p99_s']} s (200s); "
                     f"statuses {x['statuses']}; no answer {x['no_answer']}; {x['throughput_rps']} answered/s.")
    if "burst" in r:
        x = r["burst"]
        lines.append(f"\n## Burst of {x['requests']}\n\nAll answered within {x['deadline_s']:.0f} s with 200 or "
                     f"429/503 + Retry-After: **{x['all_answered_within_deadline']}** "
                     f"({x['answered_ok_or_retry_after']}/{x['requests']}); statuses {x['statuses']}; max latency "
                     f"{x['max_latency_s']} s; no answer {x['no_answer']}.")
    if "soak" in r:
        lines.append("\n## Memory (expert-smollm2 replica)\n\n" + soak_markdown(r["soak"]))
    if "memory" in r:
        x = r["memory"]
        rows = "\n".join(f"| {s['phase']} | {s['requests']} | {s['replica_mib']} | {s['tree_mib']} |" for s in x["samples"])
        lines.append(f"\n## Memory across the phases (expert-smollm2 replica)\n\nGrowth per 1,000 requests answered by "
                     f"smollm2 and its LoRAs: {x['growth_per_1000_mib']} MiB (second half of the run: "
                     f"{x['growth_per_1000_second_half_mib']}).\n\n| after | smollm2 requests | replica MiB | "
                     f"tree MiB |\n|---|---|---|---|\n{rows}")
    if "fuzz" in r:
        x = r["fuzz"]
        lines.append("\n## Fuzzing (schemathesis)\n\n" + (x.get("skipped") or
                     f"{x['requests']} requests ({x['examples_per_operation']} examples per operation, "
                     f"{x['seconds']} s{', stopped at the time limit' if x['stopped_at_time_limit'] else ''}): "
                     f"**{x['5xx']} 5xx** {x['5xx_by_status']}; statuses {x['statuses']}."
                     + (f" The HAR log could not be read ({x['har_unreadable']}): the counts are not known."
                        if x.get("har_unreadable") else "")))
    if "kill" in r:
        x = r["kill"]
        lines.append(f"\n## expert-smollm2 replica killed (SIGKILL) under {x['clients']} clients\n\n"
                     f"In flight at the kill {x['in_flight_at_kill']}, lost {x['lost']}. First fast answer "
                     f"{x['time_to_first_fast_answer_s']} s after the kill ({x['first_fast_answer']}). During the "
                     f"outage: {x['during_outage']}. smollm2 answered 200 again after {x['time_to_recover_s']} s; "
                     f"/readyz not ready for {x['readyz_not_ready_s']} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bench.record import RunRecord, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, from {PHASES}")
    ap.add_argument("--config", default=None, help="config YAML (default: the embedded default)")
    ap.add_argument("--load-clients", type=int, default=32)
    ap.add_argument("--load-s", type=float, default=45)
    ap.add_argument("--client-timeout-s", type=float, default=60)
    ap.add_argument("--burst", type=int, default=128)
    ap.add_argument("--burst-deadline-s", type=float, default=60)
    ap.add_argument("--soak-requests", type=int, default=500)
    ap.add_argument("--soak-max-s", type=float, default=90, help="stop the soak's requests after this long")
    ap.add_argument("--fuzz-examples", type=int, default=20)
    ap.add_argument("--fuzz-max-s", type=float, default=90)
    ap.add_argument("--kill-clients", type=int, default=16)
    ap.add_argument("--kill-max-s", type=float, default=150)
    ap.add_argument("--name", default="reliability")
    args = ap.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; allowed: {', '.join(PHASES)}")
    rec = RunRecord.start(note=f"coe serve, default config; phases {','.join(args.phases)}; load {args.load_s:.0f} s "
                               f"(shorter than the issue's 3 min to fit the shared machine).")
    stop_on_sigterm()
    svc = Service(free_port(), args.config)
    results: dict = {}
    try:
        asyncio.run(run_phases(svc, args, results))
    except KeyboardInterrupt:
        results["interrupted"] = True  # keep the phases that finished
    except Exception as err:  # noqa: BLE001  (a benchmark bug in one phase must not lose the others)
        results["interrupted"] = True
        results["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    finally:
        tree = svc.tree()
        stop = svc.stop()
    results.update(startup_s=round(svc.startup_s, 1), stop=stop,
                   processes_left_after_stop=svc.left_running(tree))
    data = rec.finish(results)
    md = rec.markdown_header("Reliability: load, burst, memory, fuzzing, a killed replica") + markdown(results)
    write_results(args.name, data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
