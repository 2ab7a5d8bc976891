"""Does the composition beat its best single expert? Measured end to end through the live service.

Two probe sets, both held out from the experts' training data (see coe.adapters.experts.data):

* ``profile``: MBPP ``validation`` tasks + the first half of the held-out GSM8K lines. Profiling
  the experts on it gives the outcome data the fitted router learns from
  (``coe experts profile`` + ``coe router fit``).
* ``eval``: MBPP ``test`` tasks + the second half of the held-out GSM8K lines. Never used for
  training, profiling or fitting.

``run`` sends every eval probe to every expert, pinned (``model: <id>``, greedy), and scores the
answers (coe.tools.profiling); it asks the service's router for its choice on every probe
(``POST /v1/route``, the decision ``model: "coe"`` uses); and it checks on a sample that
``model: "coe"`` really answers with the expert and the answer the pinned run got (greedy
decoding makes them equal). From these it reports, with 95% bootstrap CIs over probes:
accuracy by scorer, mean cost per query, routing share per expert, for ``coe``, every expert
and the oracle (the best expert per probe, the cheapest on ties), plus paired-bootstrap CIs of
``coe`` minus the best single expert and of the share of the oracle's gain ``coe`` recovers.
With ``--nll`` it adds the mean reference NLL (the reference answer's per-token NLL under the
expert each system picks; computed in process with the reference_nll scorer).

    python bench/composition.py probes                       # write the two probe files
    python bench/composition.py run [--config CFG] [--url URL] [--n-code 30] [--n-math 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/composition.py` from the checkout
    sys.path.insert(0, str(REPO))

from bench.record import RunRecord, write_results

PROBES = REPO / "bench" / "results" / "composition"


def _math_holdout() -> int:
    args = json.loads((REPO / "adapters/experts/math/training_args.json").read_text())
    return int(args.get("holdout", 200))


def probe_sets(n_code: int | None = None, n_math: int | None = None) -> dict[str, list]:
    from coe.adapters.experts.data import math_heldout
    from coe.scoring.probes import mbpp_probes

    mbpp = REPO.parent / "shared" / "data" / "probes" / "mbpp.jsonl"
    held = math_heldout(_math_holdout())
    half = len(held) // 2
    return {
        "profile": mbpp_probes(mbpp, split="validation")[:n_code] + held[:half][:n_math],
        "eval": mbpp_probes(mbpp, split="test")[:n_code] + held[half:][:n_math],
    }


def write_probe_files(n_code: int | None, n_math: int | None) -> dict[str, Path]:
    from coe.scoring.probes import write_probes

    PROBES.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, probes in probe_sets(n_code, n_math).items():
        out[name] = PROBES / f"{name}_probes.jsonl"
        write_probes(probes, out[name])
        print(f"{name}: {len(probes)} probes -> {out[name].relative_to(REPO)}")
    return out


class Service:
    """``coe serve`` in a subprocess (its own process group), up until ``/readyz`` answers 200."""

    def __init__(self, config: str | None, port: int) -> None:
        cmd = [str(REPO / ".venv/bin/coe"), "serve", "--port", str(port)]
        if config:
            cmd += ["--config", config]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(REPO / "bench/results/tmp-composition-serve.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 900) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coe serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(3)
        raise TimeoutError(f"the service was not ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def _routes(url: str, probes: list) -> dict[str, str]:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        out = {}
        for p in probes:
            r = client.post("/v1/route", json={"messages": [{"role": "user", "content": p.query}]})
            r.raise_for_status()
            out[p.id] = r.json()["expert"]
        return out


def _verify(url: str, probes: list, routes: dict, pinned: dict, max_tokens: int) -> dict:
    """``model: "coe"`` answers: same expert as /v1/route, same answer text as the pinned run."""
    import httpx

    same_expert = same_answer = 0
    with httpx.Client(base_url=url, timeout=600) as client:
        for p in probes:
            body = {"model": "coe", "messages": [{"role": "user", "content": p.query}], "temperature": 0.0,
                    "max_tokens": max_tokens}
            r = client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            data = r.json()
            expert = data["coe"]["expert"]
            same_expert += expert == routes[p.id]
            same_answer += data["choices"][0]["message"]["content"] == pinned[p.id]["detail"][expert].get("answer")
    return {"checked": len(probes), "same_expert": same_expert, "same_answer": same_answer}


def _boot(matrix, fn, n: int = 2000, seed: int = 0):
    """Percentile-bootstrap 95% CI of ``fn(rows)`` resampling probes (paired across systems)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k = len(matrix)
    vals = np.array([fn(matrix[rng.integers(0, k, k)]) for _ in range(n)])
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return [float("nan"), float("nan")]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def analyse(rows: list[dict], routes: dict[str, str], nll: dict | None = None) -> dict:
    """Per-system accuracy/cost/NLL with CIs; coe vs best single expert; share of oracle gain."""
    import numpy as np

    experts = list(rows[0]["outcomes"])
    q = np.array([[r["outcomes"][e] for e in experts] for r in rows])  # [N, E]
    c = np.array([[r["costs"][e] for e in experts] for r in rows])     # [N, E]
    pick_coe = np.array([experts.index(routes[r["id"]]) for r in rows])
    best_q = q.max(1, keepdims=True)
    pick_oracle = np.where(q == best_q, -c, -np.inf).argmax(1)          # cheapest among the best
    idx = np.arange(len(rows))
    systems = {e: np.full(len(rows), i) for i, e in enumerate(experts)}
    systems["coe"], systems["oracle"] = pick_coe, pick_oracle
    scorers = sorted({r.get("scorer") or r["category"] for r in rows})
    out: dict = {"n": len(rows), "experts": experts, "systems": {}}
    measured = {k: np.array([[r["detail"][e].get(k, np.nan) for e in experts] for r in rows], dtype=float)
                for k in ("completion_tokens", "latency_ms")}                  # [N, E]; nan: a failed request
    for name, pick in systems.items():
        acc = q[idx, pick]
        entry = {"accuracy": float(acc.mean()), "accuracy_ci": _boot(acc[:, None], lambda m: m.mean()),
                 "cost": float(c[idx, pick].mean()), "cost_ci": _boot(c[idx, pick][:, None], lambda m: m.mean()),
                 "share": {e: float((pick == i).mean()) for i, e in enumerate(experts)}}
        for k, m in measured.items():
            entry[f"mean_{k}"] = float(np.nanmean(m[idx, pick]))
        for s in scorers:
            mask = np.array([(r.get("scorer") or r["category"]) == s for r in rows])
            entry[f"accuracy[{s}]"] = float(acc[mask].mean())
            entry[f"accuracy[{s}]_ci"] = _boot(acc[mask][:, None], lambda m: m.mean())
        if nll is not None:
            vals = np.array([nll[r["id"]][experts[p]] for r, p in zip(rows, pick)])
            entry["nll"] = float(np.nanmean(vals))
            entry["nll_ci"] = _boot(vals[:, None], lambda m: np.nanmean(m))
        out["systems"][name] = entry
    best = max(experts, key=lambda e: out["systems"][e]["accuracy"])
    b = experts.index(best)
    paired = np.stack([q[idx, pick_coe], q[:, b], q[idx, pick_oracle]], 1)  # [N, 3]
    out["best_single"] = best
    out["coe_minus_best"] = float(paired[:, 0].mean() - paired[:, 1].mean())
    out["coe_minus_best_ci"] = _boot(paired, lambda m: m[:, 0].mean() - m[:, 1].mean())

    def recovered(m):
        gain = m[:, 2].mean() - m[:, 1].mean()
        return (m[:, 0].mean() - m[:, 1].mean()) / gain if gain > 0 else float("nan")

    out["oracle_gain_recovered"] = float(recovered(paired))
    out["oracle_gain_recovered_ci"] = _boot(paired, recovered)
    if nll is not None:
        nl = np.array([[nll[r["id"]][e] for e in experts] for r in rows])
        best_nll = min(experts, key=lambda e: out["systems"][e]["nll"])
        bn = experts.index(best_nll)
        pn = np.stack([nl[idx, pick_coe], nl[:, bn], nl.min(1)], 1)
        out["best_single_nll"] = best_nll
        out["coe_minus_best_nll"] = float(np.nanmean(pn[:, 0]) - np.nanmean(pn[:, 1]))
        out["coe_minus_best_nll_ci"] = _boot(pn, lambda m: np.nanmean(m[:, 0]) - np.nanmean(m[:, 1]))
        gain = lambda m: (np.nanmean(m[:, 1]) - np.nanmean(m[:, 0])) / (np.nanmean(m[:, 1]) - np.nanmean(m[:, 2]))
        out["oracle_nll_gain_recovered"] = float(gain(pn))
        out["oracle_nll_gain_recovered_ci"] = _boot(pn, gain)
    return out


def markdown(res: dict) -> str:
    def ci(v):
        return f"[{v[0]:.3f}, {v[1]:.3f}]"

    experts = res["experts"]
    keys = [k for k in res["systems"]["coe"] if k.startswith("accuracy[") and not k.endswith("_ci")]
    head = "| system | accuracy (95% CI) | " + " | ".join(keys) + " | mean cost | mean tokens | mean latency (s) | " + (
        "mean ref. NLL | " if "nll" in res["systems"]["coe"] else "") + "routing share |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in res["systems"].items():
        share = ", ".join(f"{e} {s['share'][e]:.0%}" for e in experts if s["share"][e] > 0)
        cells = [f"{s['accuracy']:.3f} {ci(s['accuracy_ci'])}"] + [f"{s[k]:.3f} {ci(s[k + '_ci'])}" for k in keys]
        cells += [f"{s['cost']:.1f}", f"{s['mean_completion_tokens']:.0f}", f"{s['mean_latency_ms'] / 1000:.1f}"]
        if "nll" in s:
            cells.append(f"{s['nll']:.3f} {ci(s['nll_ci'])}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {share} |")
    lines += ["", f"Best single expert by accuracy: **{res['best_single']}**. "
              f"coe − best: {res['coe_minus_best']:+.3f} {ci(res['coe_minus_best_ci'])} (paired bootstrap); "
              f"share of the oracle's gain recovered: {res['oracle_gain_recovered']:.2f} "
              f"{ci(res['oracle_gain_recovered_ci'])}."]
    if "coe_minus_best_nll" in res:
        lines.append(f"Best single expert by reference NLL: **{res['best_single_nll']}**; coe − best NLL: "
                     f"{res['coe_minus_best_nll']:+.3f} {ci(res['coe_minus_best_nll_ci'])}; oracle NLL gain "
                     f"recovered: {res['oracle_nll_gain_recovered']:.2f} {ci(res['oracle_nll_gain_recovered_ci'])}.")
    return "\n".join(lines) + "\n"


def run(args) -> int:
    from coe.tools.profiling import expert_costs, profile_experts

    rec = RunRecord.start(note=f"composition eval, config {args.config or 'default'}")
    probes = probe_sets(args.n_code, args.n_math)["eval"]
    service = None if args.url else Service(args.config, args.port)
    try:
        if service:
            service.wait_ready()
        url = args.url or service.url
        from coe.config import load_config

        # the config's experts and costs (GET /v1/experts needs the admin key, which a default run has none of)
        listed = [{"id": e.id, "config": {"cost": e.cost}} for e in load_config(args.config).experts]
        experts = expert_costs(lambda _: listed, args.expert)
        work = REPO / "bench/results/tmp-composition"
        work.mkdir(parents=True, exist_ok=True)
        out = work / f"pinned-{args.name}.jsonl"
        asyncio.run(profile_experts(url, probes, experts, out, concurrency=args.concurrency,
                                    max_tokens=args.max_tokens, keep_answers=True))
        by_id = {json.loads(line)["id"]: json.loads(line) for line in out.read_text().splitlines()}
        rows = [{**by_id[p.id], "scorer": p.scorer} for p in probes]
        routes = _routes(url, probes)
        verify = _verify(url, probes[: args.verify], routes, by_id, args.max_tokens) if args.verify else None
    finally:
        if service:
            service.stop()
    nll = reference_nll_table(probes, args.config, list(experts)) if args.nll else None
    res = analyse(rows, routes, nll)
    res["verify"], res["routes"] = verify, routes
    body = markdown(res)
    if verify:
        body += (f"\nCheck of `model: \"coe\"` on {verify['checked']} probes: same expert as `/v1/route` "
                 f"{verify['same_expert']}/{verify['checked']}, same answer as the pinned run "
                 f"{verify['same_answer']}/{verify['checked']}.\n")
    write_results(args.name, rec.finish(res), rec.markdown_header("Composition vs single experts (live service)") + body)
    print(body)
    return 0


def reference_nll_table(probes: list, config: str | None, experts: list[str]) -> dict:
    """``{probe id: {expert: mean per-token reference NLL}}`` (coe.tools.profiling.likelihood_table)."""
    from coe.tools.profiling import likelihood_table

    return likelihood_table(probes, config, experts)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("probes", help="write the profile and eval probe files")
    pr.add_argument("--n-code", type=int, default=None)
    pr.add_argument("--n-math", type=int, default=None)
    r = sub.add_parser("run", help="measure coe vs every expert vs the oracle on the eval set")
    r.add_argument("--config", default=None, help="service config (default: the embedded one)")
    r.add_argument("--url", default=None, help="use a running service instead of starting one")
    r.add_argument("--port", type=int, default=8011)
    r.add_argument("--expert", action="append", default=[])
    r.add_argument("--n-code", type=int, default=30)
    r.add_argument("--n-math", type=int, default=30)
    r.add_argument("--concurrency", type=int, default=8)
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--verify", type=int, default=6, help="probes to send as model: coe as a check")
    r.add_argument("--nll", action="store_true")
    r.add_argument("--name", default="composition_cpu")
    args = ap.parse_args(argv)
    if args.cmd == "probes":
        write_probe_files(args.n_code, args.n_math)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
