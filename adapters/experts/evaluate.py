"""Held-out evaluation of the LoRA experts against the base model (CPU).

    .venv/bin/python -m coe.adapters.experts.evaluate --math-n 60 --code-n 40

* math: GSM8K exact final-answer accuracy on the first ``--math-n`` of the held-out lines
  (the last 300 of gsm8k_train.jsonl, never trained on), greedy decoding, up to
  ``--max-new`` tokens; the answer is the number after ``####``, else the last number. Also
  the mean per-token NLL of the reference answers (teacher-forced).
* code: MBPP has no test asserts in this data set, so the measure is a proxy: the mean
  per-token NLL of a correct answer (gpt-4's when correct) on held-out ``mbpp_test.csv`` tasks.

Base and expert rows run in the same batch through :class:`coe.adapters.multilora.MultiLoRA`
(rows with no adapter are the base model). Writes ``bench/results/lora_experts_eval.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def answer_nll(model, lora, tok, pairs, adapter: str, batch_size: int, max_len: int) -> dict:
    """Mean per-token NLL of the answers, base rows vs ``adapter`` rows (same batch)."""
    import torch

    from coe.adapters.experts.data import encode_example
    from coe.adapters.experts.train import _collate

    examples = [e for e in (encode_example(tok, q, a, max_len) for q, a in pairs) if e is not None]
    sums = {"base": 0.0, adapter: 0.0}
    count = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids, mask, labels, keep = _collate(chunk + chunk, tok.pad_token_id)
        with torch.no_grad(), lora.batch([None] * len(chunk) + [adapter] * len(chunk)):
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels[:, -keep + 1 :], ignore_index=-100, reduction="none"
        ).sum(-1)  # [2b]
        n = len(chunk)
        sums["base"] += nll[:n].sum().item()
        sums[adapter] += nll[n:].sum().item()
        count += int((labels[:n] != -100).sum())
    return {"examples": len(examples), "answer_tokens": count, **{k: round(v / count, 4) for k, v in sums.items()}}


def gsm8k_accuracy(model, lora, tok, pairs, batch_size: int, max_new: int) -> dict:
    """Greedy exact-answer accuracy, base vs math (each chunk: base rows then math rows)."""

    from coe.adapters.decode import decode
    from coe.adapters.experts.data import gsm8k_final
    from coe.adapters.multilora import LoRAStepper

    correct = {"base": 0, "math": 0}
    samples = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
            for q, _ in chunk
        ]
        enc = tok(prompts + prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        rows = [None] * len(chunk) + ["math"] * len(chunk)
        out = [[] for _ in rows]
        for toks, _ in decode(
            LoRAStepper(lora, rows), enc["input_ids"], enc["attention_mask"], max_new,
            eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id,
        ):
            for r, t in enumerate(toks.tolist()):
                out[r].append(t)
        for r, ids in enumerate(out):
            text = tok.decode(ids, skip_special_tokens=True)
            q, gold = chunk[r % len(chunk)]
            pred = gsm8k_final(text)
            key = "base" if rows[r] is None else "math"
            correct[key] += int(pred is not None and pred == gold)
            if len(samples) < 6 and r % len(chunk) == 0:
                samples.append({"model": key, "gold": gold, "pred": pred, "text": text[:400]})
        print(f"gsm8k {i + len(chunk)}/{len(pairs)} {correct}", flush=True)
    n = len(pairs)
    return {"questions": n, "correct": correct, "accuracy": {k: round(v / n, 4) for k, v in correct.items()}, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--math-n", type=int, default=60)
    p.add_argument("--code-n", type=int, default=40)
    p.add_argument("--holdout", type=int, default=300)
    p.add_argument("--max-new", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", choices=["math", "code"], action="append", default=[])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "lora_experts_eval")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coe.adapters.experts.data import code_heldout, math_heldout
    from coe.adapters.multilora import MultiLoRA
    from coe.models import resolve

    torch.set_num_threads(args.threads)
    model_dir = resolve("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lora = MultiLoRA(model)
    for name in ("math", "code"):
        if name not in args.skip:
            lora.add(name, ROOT / "adapters" / "experts" / name)
    t0 = time.time()
    result: dict = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
                    f"{torch.get_num_threads()} threads, shared 2-core CPU", "args": {k: str(v) for k, v in vars(args).items()}}
    if "code" not in args.skip:
        pairs = code_heldout()[: args.code_n]
        result["code_heldout_nll"] = answer_nll(model, lora, tok, pairs, "code", 4, 384)
        print("code", result["code_heldout_nll"], flush=True)
        _write(args.out, result)
    if "math" not in args.skip:
        from coe.adapters.experts.data import GSM8K, clean_gsm8k_answer

        lines = [json.loads(x) for x in GSM8K.read_text().splitlines() if x.strip()][-args.holdout :][: args.math_n]
        nll_pairs = [(r["question"], clean_gsm8k_answer(r["answer"])) for r in lines]
        result["math_heldout_nll"] = answer_nll(model, lora, tok, nll_pairs, "math", 6, 384)
        print("math nll", result["math_heldout_nll"], flush=True)
        _write(args.out, result)  # the accuracy pass is slow on a CPU: keep what is measured
        result["gsm8k_accuracy"] = gsm8k_accuracy(
            model, lora, tok, math_heldout(args.holdout)[: args.math_n], args.batch_size, args.max_new
        )
    result["wall_s"] = round(time.time() - t0, 1)
    _write(args.out, result)
    print(report(result))


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(report(result))


def report(r: dict) -> str:
    lines = [f"# LoRA experts vs base SmolLM2-135M-Instruct, held-out ({r['date']}, {r['machine']})", ""]
    if "gsm8k_accuracy" in r:
        a = r["gsm8k_accuracy"]
        lines.append(
            f"- GSM8K exact final answer, {a['questions']} held-out questions, greedy: "
            f"base {a['correct']['base']}/{a['questions']} ({a['accuracy']['base']:.1%}), "
            f"math expert {a['correct']['math']}/{a['questions']} ({a['accuracy']['math']:.1%})"
        )
    if "math_heldout_nll" in r:
        m = r["math_heldout_nll"]
        lines.append(f"- GSM8K reference-answer NLL/token ({m['examples']} held-out): base {m['base']}, math expert {m['math']}")
    if "code_heldout_nll" in r:
        c = r["code_heldout_nll"]
        lines.append(
            f"- MBPP held-out correct-answer NLL/token ({c['examples']} mbpp_test tasks, proxy: no asserts in the data): "
            f"base {c['base']}, code expert {c['code']}"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
