"""Held-out evaluation of the LoRA experts against the base model, with paired bootstrap CIs.

    flock /tmp/coe-heavy.lock .venv/bin/python -m coe.adapters.experts.evaluate --nll-n 200 --gen-n 60

For each expert, on held-out items of its own domain (:mod:`coe.adapters.experts.data`):

* reference NLL (scorer ``reference_nll``): mean per-token NLL of the reference answer,
  teacher-forced, base vs expert. math: the last ``--holdout`` GSM8K train items (never
  trained on; GSM8K's own solutions); code: MBPP ``test`` split (reference code, fenced).
* task accuracy, greedy decoding up to ``--max-new`` tokens: math: GSM8K *test* questions,
  scorer ``exact_number``; code: MBPP ``test`` split, scorer ``code_tests`` (pass@1 by running
  the generated code and the task's asserts in the sandbox).

Base and expert rows run in the same batch through :class:`coe.adapters.multilora.MultiLoRA`
(rows without an adapter are the base model). Every item's outcome is appended to
``<out>_items.jsonl`` as it is scored, and a re-run skips what is there, so a long
evaluation runs in slices (``--budget-s``). The report (``<out>.json``, ``<out>.md``) gives
per-model means with 95% bootstrap CIs and the paired-bootstrap CI of expert − base.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPERTS = {"math": "smollm2-math", "code": "smollm2-code"}


def held_out(domain: str, kind: str, holdout: int):
    from coe.adapters.experts.data import code_heldout, math_heldout, math_test

    if domain == "code":
        return code_heldout()
    return math_heldout(holdout) if kind == "nll" else math_test()


def _done(items_file: Path) -> dict[tuple[str, str, str, str], dict]:
    done = {}
    if items_file.is_file():
        for line in items_file.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["metric"], r["domain"], r["id"], r["model"])] = r
    return done


def _append(items_file: Path, rows: list[dict]) -> None:
    with items_file.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def run_nll(like, domain, probes, done, items_file):
    from coe.scoring import get_scorer

    scorer = get_scorer("reference_nll")
    todo = [p for p in probes if ("nll", domain, p.id, "base") not in done or ("nll", domain, p.id, "expert") not in done]
    for s in range(0, len(todo), 16):
        chunk = todo[s : s + 16]
        rows = []
        for model, adapter in (("base", None), ("expert", domain)):
            for p, o in zip(chunk, scorer.score_batch(chunk, likelihood=like, adapter=adapter), strict=True):
                rows.append({"metric": "nll", "domain": domain, "id": p.id, "model": model, "score": o.score,
                             "passed": o.passed, "reason": o.reason, "tokens": (o.detail or {}).get("tokens")})
        _append(items_file, rows)
        print(f"nll {domain} {s + len(chunk)}/{len(todo)}", flush=True)


def run_generation(model, lora, tok, domain, probes, done, items_file, *, batch_size, max_new, deadline):
    import torch

    from coe.adapters.decode import decode
    from coe.adapters.experts.data import chat_prompt
    from coe.adapters.multilora import LoRAStepper
    from coe.scoring import get_scorer, score

    scorer = get_scorer("exact_number" if domain == "math" else "code_tests")
    todo = [p for p in probes if ("task", domain, p.id, "expert") not in done]
    for s in range(0, len(todo), batch_size):
        if time.time() > deadline:
            print(f"budget spent: {len(todo) - s} {domain} items left for the next run", flush=True)
            return False
        chunk = todo[s : s + batch_size]
        prompts = [chat_prompt(tok, p.query) for p in chunk]
        enc = tok(prompts + prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        rows = [None] * len(chunk) + [domain] * len(chunk)
        out: list[list[int]] = [[] for _ in rows]
        with torch.no_grad():
            for toks, _ in decode(LoRAStepper(lora, rows), enc["input_ids"], enc["attention_mask"], max_new,
                                  eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id):
                for r, t in enumerate(toks.tolist()):
                    out[r].append(t)
        recs = []
        for r, ids in enumerate(out):
            if tok.eos_token_id in ids:
                ids = ids[: ids.index(tok.eos_token_id)]
            text = tok.decode(ids, skip_special_tokens=True)
            p = chunk[r % len(chunk)]
            o = score(scorer, p, text)
            recs.append({"metric": "task", "domain": domain, "id": p.id, "model": "base" if rows[r] is None else "expert",
                         "score": o.score, "passed": o.passed, "reason": o.reason, "tokens": len(ids), "answer": text})
        _append(items_file, recs)
        print(f"task {domain} {s + len(chunk)}/{len(todo)}", flush=True)
    return True


def summarize(items_file: Path, domains: list[str]) -> dict:
    """Per domain and metric: base/expert means with bootstrap CIs, paired CI of expert − base."""
    from coe.scoring.bootstrap import bootstrap_mean, paired_difference

    recs = _done(items_file)
    out: dict = {}
    for domain in domains:
        for metric in ("nll", "task"):
            ids = sorted({k[2] for k in recs if k[0] == metric and k[1] == domain
                          and (metric, domain, k[2], "base") in recs and (metric, domain, k[2], "expert") in recs})
            if not ids:
                continue
            base = [recs[(metric, domain, i, "base")]["score"] for i in ids]
            expert = [recs[(metric, domain, i, "expert")]["score"] for i in ids]
            res = {"n": len(ids), "base": bootstrap_mean(base).as_dict(), "expert": bootstrap_mean(expert).as_dict(),
                   "expert_minus_base": paired_difference(expert, base).as_dict()}
            if metric == "task":
                res["reasons_expert"] = _top_reasons([recs[(metric, domain, i, "expert")] for i in ids])
                res["reasons_base"] = _top_reasons([recs[(metric, domain, i, "base")] for i in ids])
            else:
                toks = [recs[(metric, domain, i, "base")]["tokens"] or 0 for i in ids]
                res["answer_tokens"] = sum(toks)
            out[f"{domain}_{metric}"] = res
    return out


def _top_reasons(rows: list[dict], k: int = 4) -> dict:
    from collections import Counter

    c = Counter((r["reason"] or "passed").split(":")[0][:60] for r in rows)
    return dict(c.most_common(k))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--domains", default="math,code")
    p.add_argument("--nll-n", type=int, default=200, help="held-out items per domain for reference NLL")
    p.add_argument("--gen-n", type=int, default=60, help="held-out items per domain for task accuracy")
    p.add_argument("--holdout", type=int, default=500)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="items per generation batch (x2 rows: base + expert)")
    p.add_argument("--budget-s", type=float, default=280, help="start no new generation batch after this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-nll", action="store_true")
    p.add_argument("--skip-task", action="store_true")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the items file (no model)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "experts_eval")
    args = p.parse_args(argv)
    t0 = time.time()
    deadline = t0 + args.budget_s
    domains = args.domains.split(",")
    items_file = args.out.with_name(args.out.name + "_items.jsonl")
    if args.report_only:
        print(report(_write_report(args, items_file, domains, t0, os.getloadavg(), record_run=False)))
        return

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coe.adapters.multilora import MultiLoRA
    from coe.model_paths import resolve
    from coe.scoring.likelihood import HFLikelihood

    torch.set_num_threads(args.threads)
    model_dir = resolve("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lora = MultiLoRA(model)
    for d in domains:
        lora.add(d, ROOT / "adapters" / "experts" / d)
    like = HFLikelihood(model, tok, lora=lora, batch_size=8, max_len=1024)
    items_file.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    for d in domains:
        done = _done(items_file)
        if not args.skip_nll:
            run_nll(like, d, held_out(d, "nll", args.holdout)[: args.nll_n], done, items_file)
        if not args.skip_task and time.time() < deadline:
            run_generation(model, lora, tok, d, held_out(d, "task", args.holdout)[: args.gen_n], done, items_file,
                           batch_size=args.batch_size, max_new=args.max_new, deadline=deadline)
    result = _write_report(args, items_file, domains, t0, load_before)
    print(report(result))


def _write_report(args, items_file, domains, t0, load_before, record_run: bool = True) -> dict:
    prev = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").is_file() else {}
    runs = prev.get("runs", []) + [{
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m coe.adapters.experts.evaluate " + shlex.join(sys.argv[1:]),
        "wall_s": round(time.time() - t0, 1), "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }][: None if record_run else 0]
    adapters = {}
    for d, expert_id in EXPERTS.items():
        ta = ROOT / "adapters" / "experts" / d / "training_args.json"
        if ta.is_file():
            a = json.loads(ta.read_text())
            adapters[expert_id] = {k: a.get(k) for k in ("steps_done", "batch_size", "lr", "rank", "top_layers", "seed")}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared by the team (2-core dev machine), torch threads {args.threads}",
        "model": "smollm2-135m-instruct (fp32)", "adapters": adapters,
        "settings": {"nll_n": args.nll_n, "gen_n": args.gen_n, "max_new": args.max_new, "holdout": args.holdout,
                     "decoding": "greedy", "ci": "95% percentile bootstrap, 10000 resamples, paired for differences"},
        "runs": runs, "items_file": str(items_file.relative_to(ROOT)) if items_file.is_relative_to(ROOT) else str(items_file),
        "results": summarize(items_file, list(EXPERTS)),
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(report(result))
    return result


def _ci(d: dict, pct: bool = False) -> str:
    f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
    return f"{f(d['mean'])} [{f(d['lo'])}, {f(d['hi'])}]"


def report(r: dict) -> str:
    lines = ["# LoRA experts vs base SmolLM2-135M-Instruct on held-out items of their own domain", "",
             f"Machine: {r['machine']}. Model: {r['model']}. Adapters: {json.dumps(r['adapters'])}.",
             f"Settings: {json.dumps(r['settings'])}. Per-item outcomes: `{r['items_file']}`.", "",
             "| expert | measure | items | base | expert | expert − base (paired 95% CI) |", "|---|---|---|---|---|---|"]
    names = {"math_nll": "GSM8K reference NLL/token (held-out train tail)", "math_task": "GSM8K test exact final number",
             "code_nll": "MBPP test reference NLL/token", "code_task": "MBPP test pass@1 (asserts run in the sandbox)"}
    for key, res in r["results"].items():
        domain, metric = key.split("_")
        pct = metric == "task"
        lines.append(f"| {EXPERTS[domain]} | {names[key]} | {res['n']} | {_ci(res['base'], pct)} | {_ci(res['expert'], pct)} "
                     f"| {_ci(res['expert_minus_base'], pct)} |")
    lines += ["", ("NLL: lower is better (a negative difference is a gain). Runs (the evaluation is resumable, "
                   "run in slices under the heavy lock):"), ""]
    lines += [f"- {x['date']}: `{x['command']}`, {x['wall_s']} s, load {x['load_before']} -> {x['load_after']}" for x in r["runs"]]
    for key, res in r["results"].items():
        if "reasons_expert" in res:
            lines.append(f"- {key} outcomes: base {res['reasons_base']}; expert {res['reasons_expert']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
