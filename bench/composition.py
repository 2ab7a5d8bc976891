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

``policy`` needs no service: it asks whether a cost-aware policy would do better than the
shipped one. On the profile only, by 5-fold CV (each fold refits the config's fitted router on
the other folds and routes through the service's router), it picks the cost weight λ of
``tradeoff`` and the threshold τ of ``threshold``; then it applies the shipped router with
those settings to the held-out items and scores its choices from the stored per-expert outcomes
of ``run`` (``bench/results/composition/eval_outcomes.jsonl``): accuracy with the paired CI
against the best single expert, mean cost and latency, and the whole held-out curve for
information (nothing is chosen on it).

    python bench/composition.py probes                       # write the two probe files
    python bench/composition.py run [--config CFG] [--url URL] [--n-code 30] [--n-math 30]
    python bench/composition.py policy [--config CFG]        # bench/results/composition_policy.md
    python bench/composition.py coverage [--config CFG]      # bench/results/composition_coverage.md
    python bench/composition.py transfer [--config CFG]      # bench/results/composition_transfer.md

``coverage`` needs no service either: for queries from sources other than the profile's (GSM8K
test, MATH, HumanEval, JavaScript, MT-Bench), the share whose nearest profiled query is less
similar than ``router.min_profile_similarity`` (those are routed as ``router.outside_profile``
says), and where the config's router sends them. ``transfer`` (no service) scores coe, every
expert and the oracle by reference NLL on answers from other sources than the profile's.
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

import numpy as np

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
    rng = np.random.default_rng(seed)
    k = len(matrix)
    vals = np.array([fn(matrix[rng.integers(0, k, k)]) for _ in range(n)])
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return [float("nan"), float("nan")]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def analyse(rows: list[dict], routes: dict[str, str], nll: dict | None = None) -> dict:
    """Per-system accuracy/cost/NLL with CIs; coe vs best single expert; share of oracle gain."""
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
        st = nll_transfer_stats(np.array([[nll[r["id"]][e] for e in experts] for r in rows]), pick_coe, experts)
        out["best_single_nll"] = st["best_single"]
        out["coe_minus_best_nll"], out["coe_minus_best_nll_ci"] = st["coe_minus_best"], st["coe_minus_best_ci"]
        out["oracle_nll_gain_recovered"], out["oracle_nll_gain_recovered_ci"] = st["recovered"], st["recovered_ci"]
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
    lines += ["", (f"Best single expert by accuracy: **{res['best_single']}**. "
                   f"coe − best: {res['coe_minus_best']:+.3f} {ci(res['coe_minus_best_ci'])} (paired bootstrap); "
                   f"share of the oracle's gain recovered: {res['oracle_gain_recovered']:.2f} "
                   f"{ci(res['oracle_gain_recovered_ci'])}.")]
    if "coe_minus_best_nll" in res:
        lines.append(f"Best single expert by reference NLL: **{res['best_single_nll']}**; coe − best NLL: "
                     f"{res['coe_minus_best_nll']:+.3f} {ci(res['coe_minus_best_nll_ci'])}; oracle NLL gain "
                     f"recovered: {res['oracle_nll_gain_recovered']:.2f} {ci(res['oracle_nll_gain_recovered_ci'])}.")
    return "\n".join(lines) + "\n"


# -- cost-aware policy: λ or τ chosen on the profile by cross-validation, then applied to the held-out items --

KNOB = {"tradeoff": "lam", "threshold": "tau"}   # the policy field each cost-aware mode sweeps


def knob_sweep(mode: str, costs, n: int) -> list[float]:
    """The values swept for ``mode``, from its max-quality end to its cheapest end: λ from 0
    (``routers.policy.lambda_sweep``), τ from 1 down to 0 (task outcomes are on 0..1)."""
    from coe.routers.policy import lambda_sweep

    if mode == "tradeoff":
        return [float(x) for x in lambda_sweep(np.asarray(costs, dtype=float), n)]
    return [float(x) for x in np.linspace(1.0, 0.0, n)]


def policy_router(cfg, policy: dict, fitted, embedder):
    """The service's router (``OnlineRouter``) for ``cfg`` over its experts, with ``router.policy``
    fields replaced by ``policy`` and ``fitted`` as the fitted router."""
    from coe.routers.online import OnlineRouter

    router_cfg = cfg.router.model_copy(update={"policy": cfg.router.policy.model_copy(update=policy)})
    return OnlineRouter(router_cfg, cfg.experts, fitted=fitted, embedder=embedder)


def policy_choices(cfg, fitted, embedder, queries: list[str], mode: str, knobs) -> list[list[str]]:
    """The expert the service picks for each query under ``mode`` at each knob value (λ or τ),
    unsure queries going to the default expert as in the service."""
    return [[d.expert for d in policy_router(cfg, {"mode": mode, KNOB[mode]: float(v)}, fitted, embedder)
             .route(queries)] for v in knobs]


def cv_choices(cfg, fitted, embedder, data, mode: str, knobs, folds: int = 5, seed: int = 0) -> list[list[str]]:
    """Out-of-fold choices on the profile ``data``: per fold the fitted router's kind and params are
    refitted on the other folds (embedded as ``coe router fit`` embeds) and the service's router
    with that fit routes the held-out fold at every knob value."""
    from coe.routers.base import create_router
    from coe.routers.datasets import embed_routing_data
    from coe.routers.tuning import kfold

    x, _, _ = embed_routing_data(embedder, data)
    out = [[""] * len(data) for _ in knobs]
    for held in kfold(len(data), folds, seed):
        train = np.setdiff1d(np.arange(len(data)), held)
        fold = create_router(fitted.name, fitted.params.model_dump()).fit(data.subset(train), x[train])
        for row, names in zip(out, policy_choices(cfg, fold, embedder, [data.queries[k] for k in held], mode, knobs)):
            for k, name in zip(held, names):
                row[k] = name
    return out


def policy_stats(rows: list[dict], choices: list[str], best: str) -> dict:
    """Accuracy, mean cost/tokens/latency and share of ``best`` when each row is answered by its
    choice, with the paired-bootstrap CI of accuracy minus ``best``'s."""
    q = np.array([[r["outcomes"][e], r["outcomes"][best]] for r, e in zip(rows, choices)], dtype=float)  # [N, 2]
    detail = [r["detail"][e] for r, e in zip(rows, choices)]
    return {"accuracy": float(q[:, 0].mean()), "minus_best": float(q[:, 0].mean() - q[:, 1].mean()),
            "minus_best_ci": _boot(q, lambda m: m[:, 0].mean() - m[:, 1].mean()),
            "cost": float(np.mean([r["costs"][e] for r, e in zip(rows, choices)])),
            "mean_completion_tokens": float(np.nanmean([d.get("completion_tokens", np.nan) for d in detail])),
            "mean_latency_ms": float(np.nanmean([d.get("latency_ms", np.nan) for d in detail])),
            "share_best": float(np.mean([e == best for e in choices]))}


def curve(rows: list[dict], knobs, choices: list[list[str]], best: str) -> list[dict]:
    """:func:`policy_stats` per run of consecutive knob values that give the same choices
    (``knob_from``..``knob_to``, in sweep order)."""
    out: list[dict] = []
    for v, ch in zip(knobs, choices):
        if out and out[-1]["choices"] == ch:
            out[-1]["knob_to"] = float(v)
            continue
        out.append({"knob_from": float(v), "knob_to": float(v), "choices": ch, **policy_stats(rows, ch, best)})
    return out


def choose_knob(points: list[dict], best_accuracy: float) -> dict[str, float]:
    """The knob value chosen from cross-validated points (:func:`curve` on the profile, in sweep
    order from the max-quality end), by two rules, each the last value up to which every point
    qualifies: ``no_loss``, CV accuracy at least the best single expert's; ``ci``, the paired CI of
    CV accuracy minus the best single expert's reaches 0."""
    chosen = {}
    for rule, ok in (("no_loss", lambda p: p["accuracy"] >= best_accuracy - 1e-12),
                     ("ci", lambda p: p["minus_best_ci"][1] >= 0)):
        value = points[0]["knob_from"]
        for p in points:
            if not ok(p):
                break
            value = p["knob_to"]
        chosen[rule] = value
    return chosen


def policy_eval(args) -> int:
    """``policy``: choose λ (``tradeoff``) and τ (``threshold``) by CV on the profile, apply them to
    the stored held-out outcomes."""
    from coe.config import load_config
    from coe.routers.datasets import load_routing_data
    from coe.routers.online import build_online_router

    rec = RunRecord.start(note=f"cost-aware policy from stored outcomes, config {args.config or 'default'}")
    cfg = load_config(args.config)
    served = build_online_router(cfg.router, cfg.experts)
    if served.fitted is None:
        raise SystemExit("the config's router has no router.fitted: there is no profile to cross-validate on")
    fitted, embedder = served.fitted, served.embedder
    profile = load_routing_data(args.profile)
    prof_rows = [json.loads(line) for line in Path(args.profile).read_text().splitlines() if line.strip()]
    if [r["query"] for r in prof_rows] != list(profile.queries):
        raise SystemExit(f"{args.profile}: rows without a usable outcome were skipped ({profile.skipped}); "
                         "the CV needs every row scored")
    held = [json.loads(line) for line in Path(args.outcomes).read_text().splitlines() if line.strip()]
    experts = list(held[0]["outcomes"])
    queries = [r["query"] for r in held]

    def best_of(rows):
        return max(experts, key=lambda e: np.mean([r["outcomes"][e] for r in rows]))

    best_cv, best = best_of(prof_rows), best_of(held)
    best_cv_acc = float(np.mean([r["outcomes"][best_cv] for r in prof_rows]))
    modes, settings = {}, {"max_quality": ("tradeoff", 0.0)}
    for mode, field in KNOB.items():
        knobs = knob_sweep(mode, [e.cost for e in cfg.experts], args.steps)
        cv_points = curve(prof_rows, knobs, cv_choices(cfg, fitted, embedder, profile, mode, knobs, args.folds), best_cv)
        chosen = choose_knob(cv_points, best_cv_acc)
        settings.update({f"{mode}:{rule}": (mode, v) for rule, v in chosen.items()})
        held_points = curve(held, knobs, policy_choices(cfg, fitted, embedder, queries, mode, knobs), best)
        modes[mode] = {"knob": field, "chosen": chosen, "cv_curve": _without_choices(cv_points),
                       "heldout_curve": _without_choices(held_points)}
    b = analyse(held, {r["id"]: best for r in held})["systems"][best]
    systems = {}
    for name, (mode, v) in settings.items():
        res = analyse(held, dict(zip([r["id"] for r in held],
                                     policy_choices(cfg, fitted, embedder, queries, mode, [v])[0])))
        s = {"mode": mode, KNOB[mode]: v, **res["systems"]["coe"], "minus_best": res["coe_minus_best"],
             "minus_best_ci": res["coe_minus_best_ci"]}
        s["target_met"] = bool(s["minus_best_ci"][1] >= 0
                               and (s["cost"] < b["cost"] or s["mean_latency_ms"] < b["mean_latency_ms"]))
        systems[name] = s
    res = {"profile": _shown(args.profile), "outcomes": _shown(args.outcomes), "folds": args.folds,
           "router": {"name": fitted.name, "params": fitted.params.model_dump()},
           "costs": {e.id: e.cost for e in cfg.experts}, "best_single_cv": best_cv, "best_single_cv_accuracy": best_cv_acc,
           "best_single": best, "best_single_heldout": b, "modes": modes, "systems": systems}
    body = policy_markdown(res)
    write_results(args.name, rec.finish(res), rec.markdown_header(
        "Cost-aware policy: λ and τ chosen by CV on the profile, applied to the held-out items") + body)
    print(body)
    return 0


def _without_choices(points: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "choices"} for p in points]


def _shown(path: str) -> str:
    """``path`` relative to the checkout where it is inside it (as the results show it)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


def policy_markdown(res: dict) -> str:
    def ci(v):
        return f"[{v[0]:+.3f}, {v[1]:+.3f}]"

    def knob(p):
        a, b = p["knob_from"], p["knob_to"]
        return f"{a:.4g}" if a == b else f"{a:.4g} … {b:.4g}"

    def table(points, best, name):
        lines = [f"| {name} | accuracy | − {best} (paired 95% CI) | mean cost | mean latency (s) | share {best} |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {knob(p)} | {p['accuracy']:.3f} | {p['minus_best']:+.3f} {ci(p['minus_best_ci'])} | "
                  f"{p['cost']:.0f} | {p['mean_latency_ms'] / 1000:.1f} | {p['share_best']:.0%} |" for p in points]
        return lines

    sym = {"lam": "λ", "tau": "τ"}
    b, best = res["best_single_heldout"], res["best_single"]
    costs = ", ".join(f"{k} {v:g}" for k, v in res["costs"].items())
    out = [(f"Router: the config's fitted `{res['router']['name']}` {res['router']['params']}; configured costs "
            f"{costs}. Modes: `tradeoff` (argmax quality − λ·cost; λ = 0 is `max_quality`) and `threshold` (the "
            "cheapest expert with predicted quality ≥ τ, else the best). Mean cost per query: tokens × the expert's "
            "configured cost, as `run` reports. Latencies are the stored ones of the pinned runs (loaded, not "
            "QUIET)."), "",
           (f"Rules for the choice, on the profile only ({res['folds']}-fold CV on `{res['profile']}`; each fold "
            "refits the router on the other folds and routes through the service's router): **no_loss**, the "
            "setting furthest from max quality up to which the CV accuracy stays at least the best single "
            f"expert's ({res['best_single_cv']}, {res['best_single_cv_accuracy']:.3f}); **ci**, the same up to "
            f"which the paired CI of CV accuracy minus {res['best_single_cv']}'s still reaches 0."), "",
           f"## The chosen settings on the held-out items (`{res['outcomes']}`)", "",
           ("| system | setting | accuracy (95% CI) | − best single (paired 95% CI) | mean cost | mean tokens | "
            "mean latency (s) | routing share | target met |"), "|---|---|---|---|---|---|---|---|---|",
           (f"| {best} | — | {b['accuracy']:.3f} [{b['accuracy_ci'][0]:.3f}, {b['accuracy_ci'][1]:.3f}] | — | "
            f"{b['cost']:.1f} | {b['mean_completion_tokens']:.0f} | {b['mean_latency_ms'] / 1000:.1f} | {best} 100% | — |")]
    for name, s in res["systems"].items():
        share = ", ".join(f"{e} {v:.0%}" for e, v in s["share"].items() if v > 0)
        key = "lam" if s["mode"] == "tradeoff" else "tau"
        out.append(f"| coe ({name}) | {sym[key]} = {s[key]:.4g} | {s['accuracy']:.3f} [{s['accuracy_ci'][0]:.3f}, "
                   f"{s['accuracy_ci'][1]:.3f}] | {s['minus_best']:+.3f} {ci(s['minus_best_ci'])} | {s['cost']:.1f} | "
                   f"{s['mean_completion_tokens']:.0f} | {s['mean_latency_ms'] / 1000:.1f} | {share} | "
                   f"{'yes' if s['target_met'] else 'no'} |")
    out += ["", ("Target met: the paired CI of coe − best single reaches 0 and the mean cost or latency is lower "
                 "than the best single expert's.")]
    for mode, m in res["modes"].items():
        name = sym[m["knob"]]
        out += ["", f"## `{mode}`: {name} by CV on the profile", "",
                "Chosen: " + ", ".join(f"{rule} {name} = {v:.4g}" for rule, v in m["chosen"].items()) + ".", "",
                *table(m["cv_curve"], res["best_single_cv"], name), "",
                f"### `{mode}` over the whole held-out curve (information only: nothing was chosen on it)", "",
                *table(m["heldout_curve"], best, name)]
    return "\n".join(out) + "\n"

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


def out_of_source_queries(n: int) -> dict[str, list[str]]:
    """Queries of math, code and chat from sources other than the profile's (MBPP, GSM8K train), from
    ``../shared/data/routing`` (read by :func:`coe.routers.datasets.load_routing_data`): the first
    ``n`` of each (MT-Bench's questions, split by their categories)."""
    from coe.routers.datasets import load_routing_data

    data = REPO.parent / "shared" / "data" / "routing"

    def first(name: str) -> list[str]:
        return list(load_routing_data(data / name).queries[:n])

    mt = [json.loads(line) for line in (data / "mt_bench_questions.jsonl").read_text().splitlines() if line.strip()]
    return {
        "math: GSM8K test (same source, other split)": first("routellm_gsm8k_responses.csv"),
        "math: MATH prealgebra": first("rdc7/MATH_prealgebra.json"),
        "code: HumanEval": first("rdc7/humaneval_test.json"),
        "code: JavaScript (rdc7)": first("rdc7/javascript.json"),
        "math/code: MT-Bench math and coding": [q["turns"][0] for q in mt if q["category"] in ("math", "coding")],
        "chat: MT-Bench other categories": [q["turns"][0] for q in mt if q["category"] not in ("math", "coding")],
    }


COVERAGE_FLOORS = (0.2, 0.25, 0.3)   # the floors `coverage` reports beside the config's
OUTSIDE_MODES = ("profile_mean", "descriptions")   # router.outside_profile's values


def coverage_eval(args) -> int:
    """``coverage``: how similar queries from other sources are to the profiled ones (the fitted
    router's ``coverage``, the cosine similarity to the nearest profiled query), against
    ``router.min_profile_similarity`` and the floors of :data:`COVERAGE_FLOORS`: the share left to
    the descriptions; and where the config's router sends each set."""
    from coe.config import load_config
    from coe.routers.base import QueryBatch
    from coe.routers.online import build_online_router

    rec = RunRecord.start(note=f"profile coverage of out-of-source queries, config {args.config or 'default'}")
    cfg = load_config(args.config)
    served = build_online_router(cfg.router, cfg.experts)
    if served.fitted is None:
        raise SystemExit("the config's router has no router.fitted: nothing is profiled")
    floor = cfg.router.min_profile_similarity
    floors = sorted({*COVERAGE_FLOORS, *([] if floor is None else [floor])})
    own = [json.loads(line)["query"] for line in (PROBES / "eval_probes.jsonl").read_text().splitlines() if line.strip()]
    sets = {"held-out eval probes (MBPP test, GSM8K tail)": own, **out_of_source_queries(args.n)}
    rows = []
    for name, queries in sets.items():
        cov = np.asarray(served.fitted.coverage(QueryBatch(queries, served.embedder.encode(queries))))
        picks = [d.expert for d in served.route(queries)]
        rows.append({"set": name, "n": len(queries), "p10": float(np.percentile(cov, 10)),
                     "median": float(np.median(cov)), "p90": float(np.percentile(cov, 90)),
                     "below": {str(f): float((cov < f).mean()) for f in floors},
                     "routed": {e: picks.count(e) / len(picks) for e in sorted(set(picks), key=picks.index)}})
    lines = [(f"Fitted router `{_shown(cfg.router.fitted)}`; the config's `router.min_profile_similarity` is {floor}: "
              "a query whose similarity to the nearest profiled query is below the floor is routed as "
              f"`router.outside_profile: {cfg.router.outside_profile}` says."),
             "", "| queries | n | similarity p10 / median / p90 | "
             + " | ".join(f"below {f}{' (config)' if f == floor else ''}" for f in floors) + " | routed to (config) |",
             "|---|---|---|" + "---|" * len(floors) + "---|"]
    lines += [f"| {r['set']} | {r['n']} | {r['p10']:.2f} / {r['median']:.2f} / {r['p90']:.2f} | "
              + " | ".join(f"{r['below'][str(f)]:.0%}" for f in floors) + " | "
              + ", ".join(f"{e} {v:.0%}" for e, v in r["routed"].items()) + " |" for r in rows]
    body = "\n".join(lines) + "\n"
    write_results(args.name, rec.finish({"floor": floor, "floors": floors, "sets": rows}),
                  rec.markdown_header("Profile coverage of queries from other sources") + body)
    print(body)
    return 0


def _rb_answer(cell: str) -> str:
    """A RouterBench ``<model>|model_response`` cell (a stringified one-element list) as text."""
    import ast

    try:
        v = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        return cell
    return str(v[0]) if isinstance(v, list) and v else str(v)


def transfer_probes(n: int) -> dict[str, list]:
    """Reference-NLL probes from sources other than the profile's answers, from ``../shared/data/routing``:

    - GSM8K test questions with GPT-4's answer where it was judged correct (RouteLLM's
      ``routellm_gsm8k_responses.csv``): the profile's GSM8K lines are train questions with
      GSM8K's own terse solutions;
    - MBPP tasks as RouterBench asks them (the task text without its test) with GPT-4's passing
      answer (prose and code), leaving out tasks whose text the profile holds;
    - MT-Bench's math, reasoning and coding questions with their reference answers.

    The first ``n`` of each (MT-Bench has 30)."""
    import csv

    from coe.scoring.probes import Probe

    data = REPO.parent / "shared" / "data" / "routing"
    csv.field_size_limit(1 << 30)
    profiled = [json.loads(line)["query"] for line in (REPO / "configs/profiles/default_tasks.jsonl")
                .read_text().splitlines() if line.strip()]
    gsm, mbpp, mt = [], [], []
    with open(data / "routellm_gsm8k_responses.csv", newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if row["gpt-4-1106-preview"] == "True" and len(gsm) < n:
                gsm.append(Probe(id=f"gsm8k-test/{i}", query=row["prompt"].strip(), scorer="reference_nll",
                                 category="math", reference=row["gpt-4-1106-preview_response"].strip()))
    for name in ("mbpp_test.csv", "mbpp_train.csv"):
        with open(data / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                text = _rb_answer(row["prompt"]).strip()
                if (len(mbpp) < n and float(row["gpt-4-1106-preview"] or 0) >= 1.0
                        and not any(text in q for q in profiled)):
                    mbpp.append(Probe(id=f"routerbench-mbpp/{row['sample_id']}", query=text, scorer="reference_nll",
                                      category="code", reference=_rb_answer(row["gpt-4-1106-preview|model_response"])))
    for line in (data / "mt_bench_questions.jsonl").read_text().splitlines():
        q = json.loads(line) if line.strip() else {}
        if q.get("category") in ("math", "reasoning", "coding") and q.get("reference") and len(mt) < n:
            mt.append(Probe(id=f"mt-bench/{q['question_id']}", query=q["turns"][0], scorer="reference_nll",
                            category="code" if q["category"] == "coding" else "math",
                            reference=str(q["reference"][0])))
    return {"math: GSM8K test, GPT-4's correct answer": gsm,
            "code: MBPP as RouterBench asks it, GPT-4's passing answer": mbpp,
            "math/reasoning/code: MT-Bench, its reference answers": mt}


def nll_transfer_stats(nll: np.ndarray, pick: np.ndarray, experts: list[str], n_boot: int = 2000) -> dict:
    """``nll`` ``[N, E]`` (per-token reference NLL, lower is better; nan where a probe has no
    reference, left out of every mean), ``pick`` ``[N]`` the routed column: per-system mean NLL;
    the best single expert; coe − best and the share of the per-query oracle's gain over the best
    single that coe recovers, with paired-bootstrap 95% CIs. ``run --nll`` and ``transfer`` both
    report these."""
    idx = np.arange(len(nll))
    mean = {e: float(np.nanmean(nll[:, i])) for i, e in enumerate(experts)}
    b = int(np.argmin([mean[e] for e in experts]))
    paired = np.stack([nll[idx, pick], nll[:, b], nll.min(1)], 1)                  # coe, best single, oracle

    def recovered(m):
        gain = np.nanmean(m[:, 1]) - np.nanmean(m[:, 2])
        return (np.nanmean(m[:, 1]) - np.nanmean(m[:, 0])) / gain if gain > 0 else float("nan")

    return {"n": len(nll), "mean_nll": mean, "coe": float(np.nanmean(paired[:, 0])),
            "oracle": float(np.nanmean(paired[:, 2])),
            "coe_ci": _boot(paired[:, :1], lambda m: np.nanmean(m), n_boot),
            "best_single": experts[b], "coe_minus_best": float(np.nanmean(paired[:, 0]) - np.nanmean(paired[:, 1])),
            "coe_minus_best_ci": _boot(paired, lambda m: np.nanmean(m[:, 0]) - np.nanmean(m[:, 1]), n_boot),
            "recovered": float(recovered(paired)), "recovered_ci": _boot(paired, recovered, n_boot),
            "share": {e: float((pick == i).mean()) for i, e in enumerate(experts)},
            "oracle_share": {e: float((nll.argmin(1) == i).mean()) for i, e in enumerate(experts)}}


def stored_nll(path: str, probes: list, experts: list[str]) -> dict:
    """The per-probe NLL table a previous ``transfer`` run wrote (its ``items``), for a routing-only
    change: every probe and expert must be in it (SystemExit naming what is missing otherwise)."""
    stored = {it["id"]: it["nll"] for it in json.loads(Path(path).read_text())["items"]}
    missing = sorted({p.id for p in probes if not set(experts) <= set(stored.get(p.id, {}))})
    if missing:
        raise SystemExit(f"--nll-from {path} lacks {len(missing)} probe(s) or experts {experts}, e.g. {missing[0]}")
    return {p.id: stored[p.id] for p in probes}


def transfer_eval(args) -> int:
    """``transfer``: the issue-23 end-to-end question on local sources whose answers the profile never
    saw. The config's router routes each query (in process, as ``POST /v1/route`` does, without
    load), once per ``router.outside_profile`` mode (the config's first); every routable expert
    scores the reference answer's per-token NLL (in process, :func:`reference_nll_table`, or the
    table of ``--nll-from``); coe under each mode, every expert and the per-query oracle are
    compared per set and over all of them."""
    from coe.config import load_config
    from coe.routers.online import build_online_router

    rec = RunRecord.start(note=f"out-of-source reference NLL, config {args.config or 'default'}"
                          + (f", NLL from {_shown(args.nll_from)}" if args.nll_from else ""))
    cfg = load_config(args.config)
    sets = transfer_probes(args.n)
    probes = [p for ps in sets.values() for p in ps]
    modes = [cfg.router.outside_profile, *[m for m in OUTSIDE_MODES if m != cfg.router.outside_profile]]
    routers = [build_online_router(cfg.router, cfg.experts)]
    routers += [build_online_router(cfg.router.model_copy(update={"outside_profile": m}), cfg.experts,
                                    embedder=routers[0].embedder) for m in modes[1:]]
    picks = {m: [d.expert for d in r.route([p.query for p in probes])] for m, r in zip(modes, routers)}
    experts = sorted({e for ps in picks.values() for e in ps}
                     | set(args.expert or [e.id for e in cfg.experts if e.kind in ("model", "lora")]),
                     key=[e.id for e in cfg.experts].index)
    table = (stored_nll(args.nll_from, probes, experts) if args.nll_from
             else reference_nll_table(probes, args.config, experts))
    keep = [i for i, p in enumerate(probes) if all(np.isfinite(table[p.id].get(e, np.nan)) for e in experts)]
    nll = np.array([[table[probes[i].id][e] for e in experts] for i in keep])
    set_of = np.array([name for name, ps in sets.items() for _ in ps])[keep]
    res = {"experts": experts, "router": _shown(cfg.router.fitted or "(none)"),
           "floor": cfg.router.min_profile_similarity, "modes": modes, "dropped": len(probes) - len(keep), "by_mode": {},
           "items": [{"id": probes[i].id, "routed": {m: picks[m][i] for m in modes}, "nll": table[probes[i].id]}
                     for i in keep]}
    for m in modes:
        pick = np.array([experts.index(picks[m][i]) for i in keep])
        res["by_mode"][m] = {"all": nll_transfer_stats(nll, pick, experts),
                             "sets": {name: nll_transfer_stats(nll[set_of == name], pick[set_of == name], experts)
                                      for name in sets if (set_of == name).any()}}

    def ci(v):
        return f"[{v[0]:+.3f}, {v[1]:+.3f}]"

    lines = [(f"Router: the config's (`{res['router']}`, `min_profile_similarity` {res['floor']}), routing in "
              "process as `POST /v1/route` does (no load), under each `router.outside_profile` (the config's first). "
              "NLL: mean per-token NLL of the reference answer under each expert, in process (transformers, "
              "float32; LoRAs as the service loads them). Lower is better."), "",
             "| set | n | " + " | ".join(experts) + " | oracle | best single | outside_profile | coe | coe − best "
             "(95% CI) | oracle gain recovered (95% CI) | coe routes to |", "|---|---|" + "---|" * (len(experts) + 7)]
    for name in [*res["by_mode"][modes[0]]["sets"], "all"]:
        for m in modes:
            st = res["by_mode"][m]["all" if name == "all" else "sets"]
            st = st if name == "all" else st[name]
            lines.append(f"| {name} | {st['n']} | " + " | ".join(f"{st['mean_nll'][e]:.3f}" for e in experts)
                         + f" | {st['oracle']:.3f} | {st['best_single']} | {m} | {st['coe']:.3f} | "
                         f"{st['coe_minus_best']:+.3f} {ci(st['coe_minus_best_ci'])} | {st['recovered']:.2f} "
                         f"[{st['recovered_ci'][0]:.2f}, {st['recovered_ci'][1]:.2f}] | "
                         + ", ".join(f"{e} {v:.0%}" for e, v in st["share"].items() if v > 0) + " |")
    body = "\n".join(lines) + "\n"
    write_results(args.name, rec.finish(res), rec.markdown_header("Out-of-source reference NLL: coe vs "
                                                                   "single experts vs the oracle") + body)
    print(body)
    return 0


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
    po = sub.add_parser("policy", help="choose the cost weight λ and the threshold τ by CV on the profile; apply "
                        "them to stored held-out outcomes (no service)")
    po.add_argument("--config", default=None, help="config whose fitted router and costs to use (default: embedded)")
    po.add_argument("--profile", default=str(REPO / "configs/profiles/default_tasks.jsonl"),
                    help="the outcomes the router was fitted on (λ is chosen on these only)")
    po.add_argument("--outcomes", default=str(PROBES / "eval_outcomes.jsonl"),
                    help="held-out per-expert outcomes, as `run` stores them")
    po.add_argument("--folds", type=int, default=5)
    po.add_argument("--steps", type=int, default=401, help="λ (and τ) values in each sweep")
    po.add_argument("--name", default="composition_policy")
    co = sub.add_parser("coverage", help="how many queries from other sources the fitted router covers (no service)")
    co.add_argument("--config", default=None, help="config whose fitted router to use (default: embedded)")
    co.add_argument("--n", type=int, default=100, help="queries per source")
    co.add_argument("--name", default="composition_coverage")
    tr = sub.add_parser("transfer", help="reference NLL of coe, every expert and the oracle on answers from other "
                        "sources (no service)")
    tr.add_argument("--config", default=None, help="config whose router and experts to use (default: embedded)")
    tr.add_argument("--n", type=int, default=60, help="probes per source")
    tr.add_argument("--expert", action="append", default=[], help="experts to score (default: every routable one)")
    tr.add_argument("--nll-from", default=None, help="reuse the NLL of a previous run's JSON (a change of routing only)")
    tr.add_argument("--name", default="composition_transfer")
    args = ap.parse_args(argv)
    if args.cmd == "transfer":
        return transfer_eval(args)
    if args.cmd == "coverage":
        return coverage_eval(args)
    if args.cmd == "policy":
        return policy_eval(args)
    if args.cmd == "probes":
        write_probe_files(args.n_code, args.n_math)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
