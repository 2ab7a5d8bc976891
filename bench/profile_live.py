"""A runtime profile on the live default service (issue #23, target **Live**): how long until a
newly registered LoRA is profiled, refitted and routed, and what the profile costs the other
experts' chat latency meanwhile.

    python -m bench.profile_live [--requests 40] [--clients 2] [--max-tokens 16] [--smoke]

Starts ``coe serve`` on the embedded default config (``bench.soak.Service``, with an admin key),
then:

1. **idle**: ``--clients`` closed-loop clients send ``--requests`` short greedy chat requests
   (``--max-tokens``) pinned to the other experts (``--experts``, smollm2 and qwen-coder),
   interleaved; the p50/p95 latency per expert and over all.
2. **profile**: registers a copy of ``adapters/experts/math`` (copied into a hidden folder under
   ``adapters/experts``, the default ``serving.adapter_roots``, and removed afterwards) with
   ``profile: {probe: default, budget: 24, strategy: adaptive}`` while the same chat load keeps
   running, and polls ``GET /v1/experts/{id}`` (state, phase, probes done, ability) and
   ``POST /v1/route`` with a GSM8K-style question every ``--poll`` seconds. Times from the
   register call to (a) *measured*: the job leaves its measuring phase (first poll that reads
   ``refitting`` or ``done``); (b) *refitted*: the refit installed (the job's ``finished_at``: its
   ``done`` and the new router are installed together); (c) *routed*: the first ``/v1/route``
   plan that lists the new expert with the fitted router's own prediction (a quality with an
   uncertainty; before the refit it is scored from its description, without one). (a) and (c)
   are as fine as ``--poll``.
3. **after**: the same chat load again with the new expert registered and idle (drift check); when
   the profile had not ended by ``--timeout``, the expert is removed first (stopping its job), so
   the after phase never runs beside the profile's requests.

Chat latency *during the profile* is that of the requests sent after the register call and
answered before the job ended; its p50 over idle's, with a bootstrap 95% interval (the two
phases resampled independently), is compared with the 2x target, overall and per expert. Every
non-2xx answer is counted per phase. The profile's final ability (theta, se), its note and refit
report, the plan's ranking of the new expert on the math question, and the service's log lines
about the profile go into ``bench/results/profile_live.{json,md}`` (``--name``).
``--smoke``: 6 requests per phase and a budget of 4 (does it run? no figures).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.record import RunRecord, write_results
from bench.soak import ADMIN_KEY, Service, free_port, stop_on_sigterm
from bench.stats import percentile

TARGET_S = 180.0       # profiled, refitted and routed within 3 minutes
TARGET_RATIO = 2.0     # chat p50 during the profile within 2x of idle
EXPERT_ID = "smollm2-math-copy"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMPTS = [
    "What is the capital of France?", "Give me three tips for a job interview.",
    "Write a python function that reverses a string.", "Name three colors of the rainbow.",
    "What should I pack for a weekend trip?", "Write a function to check whether a list is sorted.",
]
# GSM8K-style, written for this script (not a probe of the default set)
MATH_QUERY = ("A baker makes 24 muffins in the morning and 18 in the afternoon. She sells 30 of them and "
              "gives 5 to her neighbor. How many muffins does she have left?")
LOG_WORDS = ("profil", "refit", "Error", "error", "Traceback", "EngineDead", "einsum")


# --------------------------------------------------------------------------- pure helpers


def ratio_ci(num: list[float], den: list[float], conf: float = 0.95, n: int = 2000, seed: int = 0) -> dict:
    """``median(num) / median(den)`` with a percentile-bootstrap ``conf`` interval, the two samples
    resampled independently (they are different requests); nan without two values in each."""
    nan = float("nan")
    if len(num) < 2 or len(den) < 2:
        return {"ratio": nan, "ci": [nan, nan], "ci_level": conf}
    rng, med = random.Random(seed), statistics.median
    ratios = sorted(med([num[rng.randrange(len(num))] for _ in num]) / med([den[rng.randrange(len(den))] for _ in den])
                    for _ in range(n))
    return {"ratio": med(num) / med(den), "ci": [percentile(ratios, 100 * (1 - conf) / 2),
                                                 percentile(ratios, 100 * (1 + conf) / 2)], "ci_level": conf}


def verdict(ci: list[float], target: float) -> str:
    """'met' when the whole interval is at most ``target``, 'missed' when all of it is above,
    else 'not resolved' (also for an interval of nan)."""
    lo, hi = ci
    if hi <= target:
        return "met"
    if lo > target:
        return "missed"
    return "not resolved"


def latency_stats(rows: list[dict]) -> dict:
    """n, errors (non-2xx), p50/p95 seconds of the 2xx answers."""
    ok = [r["latency_s"] for r in rows if 200 <= r["status"] < 300]
    return {"n": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
            "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95)}


def candidate(plan: dict, expert: str) -> dict | None:
    """The expert's entry in a ``/v1/route`` answer: 1-based ``rank``, ``quality``, ``uncertainty``
    and whether the plan chose it; None when it is not a candidate."""
    for rank, c in enumerate(plan.get("candidates") or [], 1):
        if c["expert"] == expert:
            return {"rank": rank, "of": len(plan["candidates"]), "quality": c["quality"],
                    "uncertainty": c["uncertainty"], "chosen": plan.get("expert") == expert}
    return None


def first_time(polls: list[dict], pred) -> float | None:
    """The ``t`` of the first poll for which ``pred(poll)`` holds."""
    return next((p["t"] for p in polls if pred(p)), None)


def last_job(polls: list[dict]) -> dict | None:
    """The profile job as the last poll saw it: its full record when the poll kept one (the job
    ended, or the watch timed out), else the fields every poll keeps; None without polls."""
    if not polls:
        return None
    if "job" in polls[-1]:
        return polls[-1]["job"]
    keep = ("state", "phase", "probes_done", "done", "total", "failed", "ability")
    return {k: polls[-1].get(k) for k in keep}


def during(rows: list[dict], start: float, end: float | None) -> list[dict]:
    """The requests sent at or after ``start`` and answered by ``end`` (None: no end)."""
    return [r for r in rows if r["t0"] >= start and (end is None or r["t1"] <= end)]


# --------------------------------------------------------------------------- the load


class ChatLoad:
    """Closed-loop clients, each sending short greedy chat requests pinned to ``experts`` in turn
    (request k goes to ``experts[k % len]``); every answer is kept in :attr:`rows`."""

    def __init__(self, http, experts: list[str], clients: int, max_tokens: int, t_ref: float) -> None:
        self.http, self.experts, self.clients, self.max_tokens, self.t_ref = http, experts, clients, max_tokens, t_ref
        self.rows: list[dict] = []
        self._k = 0

    async def _one(self, phase: str) -> None:
        k, self._k = self._k, self._k + 1
        expert = self.experts[k % len(self.experts)]
        body = {"model": expert, "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": PROMPTS[(k // len(self.experts)) % len(PROMPTS)]}]}
        t0 = time.monotonic()
        try:
            r = await self.http.post("/v1/chat/completions", json=body)
            status, error = r.status_code, None if r.is_success else r.text[:300]
        except Exception as err:  # noqa: BLE001  (a dropped connection is an error to count, not a crash)
            status, error = 0, f"{type(err).__name__}: {err}"
        t1 = time.monotonic()
        self.rows.append({"phase": phase, "expert": expert, "t0": round(t0 - self.t_ref, 3),
                          "t1": round(t1 - self.t_ref, 3), "latency_s": round(t1 - t0, 4), "status": status,
                          **({"error": error} if error else {})})

    async def count(self, phase: str, n: int) -> None:
        """``n`` requests in all, over the clients."""
        left = [n]

        async def client():
            while left[0] > 0:
                left[0] -= 1
                await self._one(phase)

        await asyncio.gather(*(client() for _ in range(self.clients)))

    async def until(self, phase: str, stop: asyncio.Event) -> None:
        async def client():
            while not stop.is_set():
                await self._one(phase)

        await asyncio.gather(*(client() for _ in range(self.clients)))


# --------------------------------------------------------------------------- the run


def register_body(adapter: Path, profile: dict) -> dict:
    return {"id": EXPERT_ID, "kind": "lora", "base": "smollm2", "adapter": str(adapter),
            "description": "Grade-school math word problems solved step by step with a final numeric answer "
                           "(a copy of smollm2-math, registered by bench/profile_live.py).",
            "skills": ["arithmetic", "word problems"], "profile": profile}


async def watch(http, t_ref: float, poll_s: float, timeout_s: float, polls: list[dict], routes: list[dict]) -> None:
    """Poll the expert's profile and the route of :data:`MATH_QUERY` until the job has ended and
    the plan lists the expert with a fitted prediction (or ``timeout_s``)."""
    ended, job = False, {}
    while time.monotonic() - t_ref < timeout_s:
        t0 = time.monotonic()
        r = await http.get(f"/v1/experts/{EXPERT_ID}", headers=AUTH)
        t, ms = round(t0 - t_ref, 2), round((time.monotonic() - t0) * 1000, 1)   # ms: does the ingress answer?
        job = (r.json().get("profile") or {}) if r.is_success else {}
        polls.append({"t": t, "ms": ms, "status": r.status_code, "state": job.get("state"), "phase": job.get("phase"),
                      "probes_done": job.get("probes_done"), "done": job.get("done"), "total": job.get("total"),
                      "failed": job.get("failed"), "ability": job.get("ability"),
                      **({"job": job} if job.get("state") in ("done", "failed") else {})})
        t0 = time.monotonic()
        q = await http.post("/v1/route", json={"query": MATH_QUERY})
        t, ms = round(t0 - t_ref, 2), round((time.monotonic() - t0) * 1000, 1)
        entry = candidate(q.json(), EXPERT_ID) if q.is_success else None
        routes.append({"t": t, "ms": ms, "status": q.status_code, "chosen": q.json().get("expert") if q.is_success else None,
                       "new_expert": entry})
        ended = ended or job.get("state") == "done"
        if job.get("state") == "failed" or (ended and entry is not None and entry["uncertainty"] is not None):
            return
        await asyncio.sleep(poll_s)
    if polls and job:   # timed out: the job as it stood at the last poll (its note, strategy, ability...)
        polls[-1]["job"] = job


async def scenario(url: str, args, adapter: Path, profile: dict) -> dict:
    import httpx

    t_ref, wall_ref = time.monotonic(), time.time()   # wall_ref: t = 0 on the wall clock the service stamps jobs with
    polls: list[dict] = []
    routes: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        load = ChatLoad(http, args.experts, args.clients, args.max_tokens, t_ref)
        await load.count("warmup", 2 * len(args.experts))
        await http.post("/v1/route", json={"query": MATH_QUERY})
        await load.count("idle", args.requests)
        stop = asyncio.Event()
        chat = asyncio.create_task(load.until("profile", stop))
        t_reg = time.monotonic() - t_ref
        reg = await http.post("/v1/experts", json=register_body(adapter, profile), headers=AUTH)
        t_reg_answer = time.monotonic() - t_ref
        registered = {"status": reg.status_code, "answer_s": round(t_reg_answer - t_reg, 3),
                      **({"error": reg.text[:500]} if not reg.is_success else {"profile": reg.json().get("profile")})}
        if reg.is_success:
            await watch(http, t_ref, args.poll, t_reg + args.timeout, polls, routes)
        stop.set()
        await chat
        if reg.is_success and (polls[-1]["state"] if polls else None) in ("queued", "running"):
            # the profile outlived --timeout: remove the expert (which stops its job) so that the
            # after phase measures the service without the profile's requests
            registered["delete_status"] = (await http.delete(f"/v1/experts/{EXPERT_ID}", headers=AUTH)).status_code
            registered["removed_before_after"] = True
        await load.count("after", args.requests)
        if reg.is_success and "delete_status" not in registered:
            registered["delete_status"] = (await http.delete(f"/v1/experts/{EXPERT_ID}", headers=AUTH)).status_code
    return {"t_register": round(t_reg, 3), "wall_ref": wall_ref, "register": registered, "rows": load.rows,
            "polls": polls, "routes": routes}


def analyse(raw: dict) -> dict:
    """Times vs the target, latency per phase and the p50 ratio, the profile's end and the plan."""
    t_reg, polls, routes, rows = raw["t_register"], raw["polls"], raw["routes"], raw["rows"]
    last = last_job(polls)
    finished = last["finished_at"] - raw["wall_ref"] if last and last.get("finished_at") else None
    t_measured = first_time(polls, lambda p: p["phase"] == "refitting" or p["state"] in ("done", "failed"))
    t_routed = first_time(routes, lambda r: r["new_expert"] is not None and r["new_expert"]["uncertainty"] is not None
                          and finished is not None and r["t"] >= finished)
    times = {"measured_s": t_measured, "refitted_s": finished if last and last["state"] == "done" else None,
             "routed_s": t_routed}
    times = {k: (round(v - t_reg, 1) if v is not None else None) for k, v in times.items()}
    times["within_target"] = all(v is not None and v <= TARGET_S for v in times.values())
    end = finished if finished is not None else (polls[-1]["t"] if polls else None)
    phases = {"idle": [r for r in rows if r["phase"] == "idle"],
              "profile": during([r for r in rows if r["phase"] == "profile"], t_reg, end),
              "after": [r for r in rows if r["phase"] == "after"]}
    experts = sorted({r["expert"] for r in rows})
    latency = {ph: {"all": latency_stats(rs), **{e: latency_stats([r for r in rs if r["expert"] == e]) for e in experts}}
               for ph, rs in phases.items()}

    def ok(rs, e=None):
        return [r["latency_s"] for r in rs if 200 <= r["status"] < 300 and (e is None or r["expert"] == e)]

    ratios = {}
    for e in [None, *experts]:
        rc = ratio_ci(ok(phases["profile"], e), ok(phases["idle"], e))
        rc["verdict"] = verdict(rc["ci"], TARGET_RATIO)
        rc["after_over_idle"] = ratio_ci(ok(phases["after"], e), ok(phases["idle"], e))["ratio"]
        ratios[e or "all"] = rc
    errors = [{k: r[k] for k in ("phase", "expert", "status", "error") if k in r} for r in rows
              if not 200 <= r["status"] < 300]
    final_route = routes[-1] if routes else None
    before = next((r["new_expert"] for r in routes if r["new_expert"]), None)
    refitting = [p["ms"] for p in polls if p["phase"] == "refitting"]
    polls_ms = {"admin_p50": percentile([p["ms"] for p in polls], 50), "admin_max": max((p["ms"] for p in polls), default=None),
                "admin_max_refitting": max(refitting, default=None), "route_p50": percentile([r["ms"] for r in routes], 50),
                "route_max": max((r["ms"] for r in routes), default=None),
                "non_2xx": sum(not 200 <= x["status"] < 300 for x in [*polls, *routes])}
    return {"times": times, "latency": latency, "p50_ratio": ratios, "polls_ms": polls_ms, "errors": errors[:20],
            "errors_total": len(errors), "profile": last,
            "route": {"query": MATH_QUERY, "first_listed": before, "final": final_route}}


def markdown(res: dict) -> str:
    a, reg = res["analysis"], res["raw"]["register"]
    t = a["times"]
    lines = [f"{'**Smoke run** (a few requests, budget ' + str(res['profile']['budget']) + '): no figures. ' if res['smoke'] else ''}"
             f"Registered `{EXPERT_ID}` (a copy of adapters/experts/math) with `profile: {res['profile']}`: "
             f"HTTP {reg['status']} in {reg['answer_s']} s" + (f", error: {reg.get('error')}" if reg.get("error") else "") + ".",
             "", "| from the register call to | seconds | target |", "|---|---|---|"]

    def cell(v):
        return "never" if v is None else f"{v}"

    lines += [f"| profile measured (left its measuring phase) | {cell(t['measured_s'])} | |",
              f"| refit installed (job done) | {cell(t['refitted_s'])} | |",
              (f"| routed (in /v1/route's plan with a fitted prediction) | {cell(t['routed_s'])} | ≤ {TARGET_S:.0f} "
               f"({'met' if t['within_target'] else 'missed'}) |"), ""]
    lines += ["| phase | expert | requests | errors | p50 ms | p95 ms |", "|---|---|---|---|---|---|"]
    for ph, by in a["latency"].items():
        for e, s in by.items():
            lines.append(f"| {ph} | {e} | {s['n']} | {s['errors']} | {s['p50_s'] * 1000:.0f} | {s['p95_s'] * 1000:.0f} |")
    lines += ["", "| expert | p50 during the profile / idle [95% CI] | vs 2x | after / idle |", "|---|---|---|---|"]
    for e, r in a["p50_ratio"].items():
        lines.append(f"| {e} | {r['ratio']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['verdict']} | "
                     f"{r['after_over_idle']:.2f} |")
    job = a["profile"] or {}
    ab = job.get("ability") or {}
    refit = job.get("refit") or {}
    lines += ["", f"Profile: state {job.get('state')}, strategy {job.get('strategy')}, {job.get('probes_done')} probes "
              f"({job.get('done')}/{job.get('total')} requests, {job.get('failed')} failed), ability theta "
              f"{ab.get('theta', float('nan')):.2f}, se {ab.get('se', float('nan')):.2f} "
              f"({ab.get('answered')} outcomes); refit {refit.get('selected_by')} {refit.get('params')} "
              f"in {refit.get('seconds')} s" + (f"; note: {job['note']}" if job.get("note") else "")
              + (f"; error: {job['error']}" if job.get("error") else "") + "."]
    rt = a["route"]
    fin = (rt["final"] or {}).get("new_expert")
    first = rt["first_listed"]
    lines.append(f"Route of a GSM8K-style question: before the refit the new expert ranked "
                 f"{first['rank'] if first else '-'} of {first['of'] if first else '-'} (quality "
                 f"{first['quality'] if first else '-'}, by its description); at the end "
                 + (f"{fin['rank']} of {fin['of']}, quality {fin['quality']:.3f} ± {fin['uncertainty']}, "
                    f"chosen: {fin['chosen']}" if fin else "not listed")
                 + f" (plan's pick: {(rt['final'] or {}).get('chosen')}).")
    pm = a["polls_ms"]
    lines.append(f"Errors (non-2xx chat answers): {a['errors_total']}; polls: {pm['non_2xx']} non-2xx. The ingress "
                 f"answered GET /v1/experts/{{id}} in p50 {pm['admin_p50']:.0f} ms, max {pm['admin_max']} ms "
                 f"({'max ' + str(pm['admin_max_refitting']) + ' ms while refitting' if pm['admin_max_refitting'] else 'no poll fell in the refit'}), /v1/route in p50 {pm['route_p50']:.0f} ms, "
                 f"max {pm['route_max']} ms.")
    if reg.get("removed_before_after"):
        lines.append("The profile had not ended at --timeout: the expert was removed (its job stopped) before the "
                     "after phase.")
    lines.append(f"\nLoad: {res['clients']} closed-loop clients, chat pinned to {', '.join(res['experts'])} in turn, "
                 f"max_tokens {res['max_tokens']}, greedy; {res['requests']} requests idle and after; "
                 f"polls every {res['poll_s']} s (times (a), (c) are as fine as that).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="chat requests in the idle and in the after phase")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--experts", default="smollm2,qwen-coder", help="the other experts the chat load is pinned to")
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--strategy", default="adaptive")
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between polls of the profile and the route")
    ap.add_argument("--timeout", type=float, default=1500, help="give up on the profile after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="6 requests per phase and a budget of 4: does it run?")
    ap.add_argument("--name", default="profile_live")
    args = ap.parse_args(argv)
    args.experts = args.experts.split(",")
    if args.smoke:
        args.requests, args.budget = 6, 4
    profile = {"probe": "default", "budget": args.budget, "strategy": args.strategy}
    stop_on_sigterm()
    rec = RunRecord.start(note=("SMOKE RUN, no figures. " if args.smoke else "") + "issue 23 Live target")
    src = REPO / "adapters" / "experts" / "math"
    with tempfile.TemporaryDirectory(prefix=".profile-live-", dir=src.parent) as tmp:   # under adapter_roots
        adapter = Path(tmp) / "math"
        shutil.copytree(src, adapter)
        service = Service(free_port())
        try:
            raw = asyncio.run(scenario(service.url, args, adapter, profile))
        finally:
            raw_log = [line for line in service.lines if any(w in line for w in LOG_WORDS)]
            stopped = service.stop()
    res = {"smoke": args.smoke, "profile": profile, "requests": args.requests, "clients": args.clients,
           "max_tokens": args.max_tokens, "experts": args.experts, "poll_s": args.poll,
           "startup_s": round(service.startup_s, 1), "stop": stopped, "raw": raw, "analysis": analyse(raw),
           "service_log": raw_log[-60:]}
    body = markdown(res)
    write_results(args.name, rec.finish(res), rec.markdown_header("A runtime profile on the live default service "
                                                                  "(issue 23, Live)") + body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
