"""Profile experts through a running service: the outcome data a fitted router learns from.

Every probe (:mod:`coe.scoring.probes`) is sent to every named expert, pinned with
``model: <expert id>``, greedy, through ``POST /v1/chat/completions``; each answer is scored
by the probe's scorer (:mod:`coe.scoring`) in this process (``code_tests`` runs the code in its own
sandboxed subprocess, never in the service). The result is the native routing JSONL that
``coe router fit`` reads, one line per probe::

    {"id": "mbpp/11", "query": "...", "category": "code",
     "outcomes": {"smollm2": 0.0, "smollm2-code": 1.0},
     "costs": {"smollm2": 212.0, "smollm2-code": 198.0},
     "detail": {"smollm2": {"tokens": 212, "reason": "AssertionError ..."}, ...}}

``costs`` are the measured tokens (prompt + completion) times the expert's configured ``cost``.
One cell (outcome, cost, detail) is :func:`coe.scoring.cells.task_cell`, shared with the service's background
profile of a newly registered expert (``serving/api/profiles.py``, kind ``task``).

The run is resumable, per cell: a line is appended (and flushed) only when a probe has an outcome
for every expert it lacked, and a re-run asks only for the (probe, expert) cells not yet in the
output. So an expert added later is profiled into the same file: its answers are appended, and
the lines of one probe are folded into one when the run ends (or at the next run's start, after
a killed run). Requests run
concurrently (``concurrency``), scoring runs in worker threads. A failed request (HTTP error,
timeout) is recorded as a failed outcome with its reason and the run goes on; a scorer that
crashes does the same. Scorers that need likelihoods (``choice``, ``reference_nll``) are refused
by :func:`profile_experts`.

Likelihood profiles (outcome ``exp(-mean NLL)`` of each probe's reference answer, the scale of the
shipped router data) are defined once in :mod:`coe.scoring.served_likelihood`: :func:`profile_likelihood_service`
asks a running service (``POST /v1/completions`` with the ``encode_chat`` token ids, ``echo``,
``logprobs: 0``), the same request the service's background profile of a new expert sends to the
engine; :func:`profile_likelihood` computes it in this process with the config's models.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coe.errors import ExpertNotFoundError, InvalidRequestError
from coe.scoring.cells import GENERATION_SCORERS, task_cell


@dataclass
class ProfileRun:
    """What one :func:`profile_experts` call did."""

    probes: int
    skipped: int
    written: int
    failures: dict[str, int] = field(default_factory=dict)  # expert -> failed requests/scorers
    mean_outcome: dict[str, float] = field(default_factory=dict)


def _items(out: Path) -> list:
    """Every line of ``out`` in file order: its JSON object, or the line itself when it is not one."""
    if not out.exists():
        return []
    items: list = []
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        items.append(rec if isinstance(rec, dict) else line)
    return items


def done_cells(out: Path) -> dict[str, set[str]]:
    """``{probe id: the experts it has an outcome for}`` in ``out`` (over every line of the id)."""
    have: dict[str, set[str]] = {}
    for rec in _items(out):
        if isinstance(rec, dict) and "id" in rec:
            have.setdefault(str(rec["id"]), set()).update((rec.get("outcomes") or {}).keys())
    return have


def done_ids(out: Path) -> set[str]:
    """Probe ids already written to ``out`` (a torn last line from a killed run is ignored)."""
    return set(done_cells(out))


def merge_lines(out: Path) -> int:
    """Fold the lines that share a probe id into its first line (:func:`coe.routers.datasets.fold_by_id`),
    so that an expert profiled into an existing file adds its columns to the rows already there.
    Every other line (no id, not JSON) is kept as it is. Rewrites ``out`` atomically, and only when
    some id is on more than one line; returns how many lines were folded."""
    from coe.routers.datasets import fold_by_id

    items = _items(out)
    merged = fold_by_id(items)
    folded = len(items) - len(merged)
    if folded:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join((json.dumps(r) if isinstance(r, dict) else r) + "\n" for r in merged), encoding="utf-8")
        tmp.replace(out)
    return folded


def _repair_tail(out: Path) -> None:
    """Cut a torn last line (no newline) left by a killed run, so appends start clean."""
    if out.exists():
        data = out.read_bytes()
        if data and not data.endswith(b"\n"):
            out.write_bytes(data[: data.rfind(b"\n") + 1])


async def _ask(client, expert: str, query: str, max_tokens: int) -> tuple[str | None, dict, str | None]:
    """(answer, usage, error) for one pinned, greedy chat request; ``usage`` holds ``tokens`` (prompt +
    completion), ``completion_tokens`` and ``latency_ms`` (the request's wall time seen by the client)."""
    import httpx

    body = {
        "model": expert,
        "messages": [{"role": "user", "content": query}],
        "temperature": 0.0,
        "max_tokens": max_tokens,
    }
    start = time.perf_counter()
    try:
        r = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as err:
        return None, {"tokens": 0}, f"request failed: {type(err).__name__}"
    if r.status_code != 200:
        try:
            msg = r.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - any non-JSON error body
            msg = r.text[:200]
        return None, {"tokens": 0}, f"HTTP {r.status_code}: {msg}"
    data = r.json()
    usage = data.get("usage") or {}
    measured = {"tokens": int(usage.get("total_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0),
                "latency_ms": round((time.perf_counter() - start) * 1000, 1)}
    return data["choices"][0]["message"].get("content") or "", measured, None


def expert_costs(client_get: Callable[[str], Any], experts: list[str] | None) -> dict[str, float]:
    """``{expert id: configured cost}`` of the service's experts (all, or the ``experts`` named).

    Raises ExpertNotFoundError naming an unknown expert and the known ones."""
    listed = client_get("/v1/experts")
    known = {e["id"]: float((e.get("config") or {}).get("cost", 1.0)) for e in listed}
    if not experts:
        return known
    unknown = [e for e in experts if e not in known]
    if unknown:
        raise ExpertNotFoundError(f"unknown expert(s) {', '.join(unknown)}; the service has: {', '.join(sorted(known))}")
    return {e: known[e] for e in experts}


async def profile_experts(
    url: str,
    probes: list,
    experts: dict[str, float],
    out: Path,
    *,
    concurrency: int = 4,
    max_tokens: int = 256,
    timeout_s: float = 300.0,
    headers: dict[str, str] | None = None,
    progress: bool = True,
    transport=None,
    keep_answers: bool = False,
) -> ProfileRun:
    """Profile ``experts`` (``{id: cost}``) on ``probes`` through the service at ``url``; append
    to ``out`` (see the module docstring). Raises InvalidRequestError for a likelihood-only probe.
    ``transport`` is an optional httpx transport (an in-process ASGI app, in tests);
    ``keep_answers`` also stores each answer's text in ``detail``."""
    import httpx
    from tqdm import tqdm

    from coe.scoring.base import get_scorer

    if not experts:
        raise InvalidRequestError("no experts to profile")
    bad = sorted({p.scorer for p in probes if p.scorer not in GENERATION_SCORERS})
    if bad:
        raise InvalidRequestError(
            f"scorer(s) {', '.join(bad)} need likelihoods, which profiling through the service does not support yet; "
            f"allowed: {', '.join(GENERATION_SCORERS)}")
    todo = _todo(out, probes, experts)
    scorers = {name: get_scorer(name) for name in {p.scorer for p, _ in todo}}
    run = ProfileRun(probes=len(probes), skipped=len(probes) - len(todo), written=0)
    totals: dict[str, list[float]] = {e: [] for e in experts}
    gate = asyncio.Semaphore(max(1, concurrency))
    write_lock = asyncio.Lock()
    bar = tqdm(total=sum(len(es) for _, es in todo), desc="profile", unit="answer", disable=not progress)

    async def one(client, probe, expert) -> tuple[float, float, dict]:
        async with gate:
            answer, usage, error = await _ask(client, expert, probe.query, max_tokens)
        if error is not None:
            run.failures[expert] = run.failures.get(expert, 0) + 1
        cell = await asyncio.to_thread(task_cell, probe, answer, usage, experts[expert], error=error,
                                       scorer=scorers[probe.scorer], keep_answer=keep_answers)
        bar.update(1)
        return cell

    async def probe_line(client, item) -> None:
        probe, missing = item
        results = await asyncio.gather(*(one(client, probe, e) for e in missing))
        rec = {
            "id": probe.id,
            "query": probe.query,
            "category": probe.category,
            "outcomes": {e: r[0] for e, r in zip(missing, results)},
            "costs": {e: r[1] for e, r in zip(missing, results)},
            "detail": {e: r[2] for e, r in zip(missing, results)},
        }
        async with write_lock:
            with out.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
            run.written += 1
            for e, r in zip(missing, results):
                totals[e].append(r[0])

    limits = httpx.Limits(max_connections=max(1, concurrency) * 2)
    client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers or {}, timeout=timeout_s,
                               limits=limits, transport=transport)
    return await _in_waves(client, todo, probe_line, concurrency, bar, run, totals, out)


def _todo(out: Path, probes: list, experts: dict[str, float]) -> list[tuple[object, list[str]]]:
    """``(probe, the experts it still lacks in out)`` for every probe that lacks one; ``out`` is
    first repaired (a torn last line cut) and its lines of one id folded (:func:`merge_lines`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(out)
    merge_lines(out)
    have = done_cells(out)
    todo = [(p, [e for e in experts if e not in have.get(p.id, ())]) for p in probes]
    return [(p, missing) for p, missing in todo if missing]


def profile_summary(run: ProfileRun, out: Path) -> str:
    lines = [f"{run.written} probe(s) written to {out} ({run.skipped} already there, {run.probes} in the set)"]
    for e, m in run.mean_outcome.items():
        fails = run.failures.get(e, 0)
        lines.append(f"  {e:24} mean outcome {m:.3f}" + (f"  ({fails} failed request(s))" if fails else ""))
    return "\n".join(lines)


def likelihood_table(probes: list, config: str | None, experts: list[str]) -> tuple[dict, dict]:
    """``({probe id: {expert: mean per-token NLL of the probe's reference}}, {probe id: reference
    tokens})``, in this process.

    One transformers model per ``model`` expert of the config, its LoRA experts as rows of one
    MultiLoRA (the same weights the service loads); nan where a probe has no reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coe.adapters.multilora import MultiLoRA
    from coe.config import load_config
    from coe.model_paths import resolve
    from coe.scoring.likelihood import HFLikelihood
    from coe.scoring.reference_nll import ReferenceNLL

    cfg = load_config(config)
    table: dict = {p.id: {} for p in probes}
    tokens: dict = {}
    scorer = ReferenceNLL()
    for host in [e for e in cfg.experts if e.kind == "model"]:
        loras = [e for e in cfg.experts if e.kind == "lora" and e.base == host.id and e.id in experts]
        if host.id not in experts and not loras:
            continue
        model_dir = resolve(host.model)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        lora = MultiLoRA(model) if loras else None
        for e in loras:
            lora.add(e.id, e.adapter)
        like = HFLikelihood(model, tok, lora=lora, batch_size=8, max_len=1024)
        for eid, adapter in [(host.id, None), *[(e.id, e.id) for e in loras]]:
            if eid not in experts:
                continue
            for p, o in zip(probes, scorer.score_batch(probes, likelihood=like, adapter=adapter)):
                table[p.id][eid] = o.score if o.passed else float("nan")
                if o.passed:
                    tokens[p.id] = o.detail["tokens"]
        del model, lora, like
    return table, tokens


def profile_likelihood(probes: list, config: str | None, experts: dict[str, float], out: Path) -> ProfileRun:
    """Profile by likelihood, in this process (the service exposes no prompt log-probabilities
    yet): each outcome is the reference answer's per-token likelihood ``exp(-NLL)`` in (0, 1]
    (higher is better) under the expert, each cost the reference's tokens times the expert's
    configured cost. Probes without a reference are skipped. Overwrites ``out``."""
    import math

    from coe.scoring.served_likelihood import likelihood_cell

    probes = [p for p in probes if (p.reference or "").strip()]
    if not probes:
        raise InvalidRequestError("no probe has a reference answer: likelihood profiling needs 'reference'")
    table, tokens = likelihood_table(probes, config, list(experts))
    missing = [e for e in experts if not any(e in row for row in table.values())]
    if missing:
        raise ExpertNotFoundError(f"expert(s) {', '.join(missing)} are not model or LoRA experts of the config")
    run = ProfileRun(probes=len(probes), skipped=0, written=0)
    totals: dict[str, list[float]] = {e: [] for e in experts}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for p in probes:
            nll = table[p.id]
            if any(math.isnan(nll[e]) for e in experts):
                continue
            cells = {e: likelihood_cell(nll[e], tokens[p.id], experts[e]) for e in experts}
            rec = _likelihood_record(p, cells)
            fh.write(json.dumps(rec) + "\n")
            run.written += 1
            for e in experts:
                totals[e].append(rec["outcomes"][e])
    run.mean_outcome = {e: (sum(v) / len(v) if v else float("nan")) for e, v in totals.items()}
    return run


def _likelihood_record(probe, cells: dict[str, tuple[float, float, dict]]) -> dict:
    """One native routing line from ``{expert: likelihood_cell(...)}``."""
    return {"id": probe.id, "query": probe.query, "category": probe.category,
            "outcomes": {e: c[0] for e, c in cells.items()}, "costs": {e: c[1] for e, c in cells.items()},
            "detail": {e: c[2] for e, c in cells.items()}}


async def profile_likelihood_service(url: str, probes: list, experts: dict[str, float], tokenizers: dict, out: Path, *,
                                     concurrency: int = 4, timeout_s: float = 300.0, headers: dict | None = None,
                                     progress: bool = True, transport=None) -> ProfileRun:
    """Profile ``experts`` (``{id: cost}``) by reference likelihood through the service at ``url``
    (see the module docstring); ``tokenizers`` maps each expert to its model's tokenizer. Probes
    without a reference are skipped; a probe is written (appended, resumable like
    :func:`profile_experts`) when every expert scored it, else counted as failed with the reason."""
    import httpx
    from tqdm import tqdm

    from coe.scoring.served_likelihood import (
        ScoringError,
        answer_nll_from_completion,
        completions_body,
        likelihood_cell,
        scoring_prompt,
    )

    probes = [p for p in probes if (p.reference or "").strip()]
    if not probes:
        raise InvalidRequestError("no probe has a reference answer: likelihood profiling needs 'reference'")
    todo = _todo(out, probes, experts)
    run = ProfileRun(probes=len(probes), skipped=len(probes) - len(todo), written=0)
    totals: dict[str, list[float]] = {e: [] for e in experts}
    gate = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=sum(len(es) for _, es in todo), desc="likelihood", unit="score", disable=not progress)

    async def one(client, probe, expert):
        sp = scoring_prompt(tokenizers[expert], probe.query, probe.reference)
        async with gate:
            try:
                r = await client.post("/v1/completions", json=completions_body(expert, sp))
                if r.status_code != 200:
                    raise ScoringError(f"HTTP {r.status_code}: {r.text[:200]}")
                nll = answer_nll_from_completion(r.json()["choices"][0], sp)
                return likelihood_cell(nll, sp.answer_tokens, experts[expert])
            except (httpx.HTTPError, ScoringError, KeyError, ValueError) as err:
                run.failures[expert] = run.failures.get(expert, 0) + 1
                return str(err) or type(err).__name__
            finally:
                bar.update(1)

    async def probe_line(client, item):
        probe, missing = item
        cells = dict(zip(missing, await asyncio.gather(*(one(client, probe, e) for e in missing))))
        if any(isinstance(c, str) for c in cells.values()):
            return
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_likelihood_record(probe, cells)) + "\n")
        run.written += 1
        for e, c in cells.items():
            totals[e].append(c[0])

    client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers or {}, timeout=timeout_s,
                               transport=transport)
    return await _in_waves(client, todo, probe_line, concurrency, bar, run, totals, out)


async def _in_waves(client, todo: list, probe_line, concurrency: int, bar, run: ProfileRun,
                    totals: dict[str, list[float]], out: Path) -> ProfileRun:
    """Run ``probe_line(client, item)`` over ``todo`` in waves of ``concurrency`` probes (so at most
    ~concurrency probes are half-done at any time), close ``client`` and ``bar``, fold the new
    lines into the rows already in ``out`` and fill ``run.mean_outcome`` from ``totals``."""
    try:
        async with client:
            wave = max(1, concurrency)
            for i in range(0, len(todo), wave):
                await asyncio.gather(*(probe_line(client, p) for p in todo[i:i + wave]))
    finally:
        bar.close()
        merge_lines(out)
    run.mean_outcome = {e: (sum(v) / len(v) if v else float("nan")) for e, v in totals.items()}
    return run


def service_tokenizers(listed: list[dict], experts: list[str]) -> dict:
    """``{expert: tokenizer}`` from ``GET /v1/experts`` rows: a model's own, a LoRA's base model's
    (loaded in this process from the model reference the service reports)."""
    from coe.model_paths import resolve
    from coe.serving.engines.tokens import load_tokenizer

    by_id = {e["id"]: e.get("config") or {} for e in listed}
    cache: dict[str, object] = {}
    out = {}
    for eid in experts:
        cfg = by_id[eid]
        host = by_id.get(cfg["base"], {}) if cfg.get("kind") == "lora" else cfg
        if "model" not in host:
            raise InvalidRequestError(f"expert {eid!r} is a {cfg.get('kind')} expert: only model and LoRA experts "
                                      "can be profiled by likelihood")
        ref = resolve(host["model"])
        if ref not in cache:
            cache[ref] = load_tokenizer(ref)
        out[eid] = cache[ref]
    return out
