"""Train the MoLE mixture over the math and code experts (gates only; CPU), reproducibly.

    .venv/bin/python -m coe.adapters.experts.train_mixture --out adapters/experts/mixture

The mixture folder references the experts' own folders (``adapters/<name>`` are relative
symbolic links to ``adapters/experts/<name>``): no copies of their weights are committed.

Data: an equal number of math (GSM8K train part) and code (MBPP train) examples, shuffled
with the seed, chat-formatted as for the experts (loss on the answer tokens). Writes the
mixture folder (:mod:`coe.adapters.mole` format), ``training_args.json``, ``loss.json``,
``loss.png`` and ``gate_report.json``: the mean gate weights on held-out math and code
prompts, averaged over their (non-padding) tokens, system prompt included (does the gate
send math to the math expert?).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def link_experts(out: Path, experts: dict[str, Path]) -> None:
    """Make ``out/adapters/<name>`` a relative symbolic link to each expert's own folder, so the
    mixture references the experts instead of holding byte-identical copies of their weights
    (the MoLE format reads ``adapters/<name>``; a link is followed like a folder)."""
    import os
    import shutil

    (out / "adapters").mkdir(parents=True, exist_ok=True)
    for name, src in experts.items():
        dst = out / "adapters" / name
        if dst.is_symlink():
            dst.unlink()
        elif dst.exists():
            shutil.rmtree(dst)
        dst.symlink_to(os.path.relpath(src.resolve(), dst.parent.resolve()), target_is_directory=True)


def save_referencing(mole, out: Path, experts: dict[str, Path]) -> None:
    """``mole.save`` (which copies the experts), then the copies replaced by links."""
    adapters = out / "adapters"
    for name in experts:  # MoLE.save would copy a folder onto itself through an existing link
        if (adapters / name).is_symlink():
            (adapters / name).unlink()
    mole.save(out, experts)
    link_experts(out, experts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "adapters" / "experts" / "mixture")
    p.add_argument("--per-domain", type=int, default=32)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--balance-coef", type=float, default=0.01)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--holdout", type=int, default=300)
    p.add_argument("--report-n", type=int, default=6, help="held-out prompts per domain for the gate report")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coe.adapters.experts.data import code_heldout, encode_example, math_heldout
    from coe.adapters.experts.train import plot_loss, training_pairs
    from coe.adapters.mole import MoLE
    from coe.adapters.mole_train import train_gates
    from coe.model_paths import resolve
    from coe.scoring.likelihood import collate

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    model_dir = resolve("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(model_dir)

    def pick(pairs, n):
        enc = [e for e in (encode_example(tok, q, a, args.max_len) for q, a in pairs) if e is not None]
        rng.shuffle(enc)
        return enc[:n]

    examples = pick(training_pairs("math", args.holdout), args.per_domain) + pick(training_pairs("code", 0), args.per_domain)
    rng.shuffle(examples)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    experts = {"math": ROOT / "adapters" / "experts" / "math", "code": ROOT / "adapters" / "experts" / "code"}
    mole = MoLE(model, list(experts.items()), top_k=args.top_k)
    t0 = time.time()
    history = train_gates(
        mole, examples, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        balance_coef=args.balance_coef, pad_id=tok.pad_token_id, seed=args.seed,
    )
    save_referencing(mole, args.out, experts)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record.update(model_dir=str(model_dir), n_examples=len(examples), wall_s=round(time.time() - t0, 1))
    (args.out / "training_args.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "loss.json").write_text(json.dumps({"history": history}) + "\n")
    plot_loss([h["loss"] for h in history], args.out / "loss.png", "MoLE gates over math+code experts")

    report = {}
    with torch.no_grad():
        for domain, pairs in (("math", math_heldout(args.holdout)), ("code", code_heldout())):
            prompts = [p.query for p in pairs[: args.report_n]]
            enc = [encode_example(tok, q, "", 10_000)[0][:-1] for q in prompts]  # prompt only
            ids, mask, _, _ = collate([(e, 1) for e in enc], tok.pad_token_id)
            mole(ids, mask, logits_to_keep=1)
            m = mask.unsqueeze(-1).float()  # mean over real (not padding) prompt tokens
            weights = {l: ((w * m).sum((0, 1)) / m.sum()).tolist() for l, w in mole.last_weights.items()}
            report[domain] = {
                "mean_weight_math_expert": round(sum(w[0] for w in weights.values()) / len(weights), 4),
                "per_layer": weights,
            }
    (args.out / "gate_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v["mean_weight_math_expert"] for k, v in report.items()}))


if __name__ == "__main__":
    main()
