"""Train one LoRA expert on SmolLM2-135M-Instruct (CPU, peft), reproducibly and resumably.

    nice -n 19 .venv/bin/python -m coe.adapters.experts.train --domain math --out adapters/experts/math
    nice -n 19 .venv/bin/python -m coe.adapters.experts.train --domain code --out adapters/experts/code

Data (:mod:`coe.adapters.experts.data`): ``math`` trains on GSM8K train minus its last
``--holdout`` lines; ``code`` on MBPP's ``train`` split (prompt: the task and its first
assert; answer: the reference code in a fenced block). The loss covers only the assistant
answer tokens and the closing ``<|im_end|>``. Sequences are left-padded so that every answer
ends at the last position and only the last ``max_answer + 1`` positions go through the LM head.

Every ``--save-every`` steps it writes into ``--out`` the PEFT adapter, ``training_args.json``
(every argument, the seed, data sizes, steps done, wall time), ``loss.json`` and ``loss.png``;
and into ``--ckpt`` the optimizer and RNG state. Re-running the same command resumes from
there (the batch order is a function of the seed, so a resumed run sees the same batches);
``--steps`` may be raised on resume to train longer (the schedule then follows the new total).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from coe.scoring.likelihood import (
    collate,  # the one left-padded answer batching (training and scoring)
)

ROOT = Path(__file__).resolve().parents[2]
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# arguments that must match for a checkpoint to be resumed
_SAME_ON_RESUME = ("domain", "model", "batch_size", "rank", "alpha", "targets", "top_layers", "max_len", "holdout", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--domain", choices=["math", "code"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, default=None, help="resume state (default bench/results/tmp/expert-<domain>)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="coe.model_paths.resolve reference")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default=ALL_LINEAR)
    p.add_argument("--top-layers", type=int, default=0,
                   help="adapt only the last N decoder layers (0: all); backward then stops at the first adapted layer")
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--holdout", type=int, default=500, help="math: last N GSM8K train lines kept out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=10)
    return p.parse_args(argv)


def batches(examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random):
    """Endless shuffled batches of (token ids, answer length), one reshuffle per epoch."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def plot_loss(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="step")
    w = 10
    if len(losses) >= w:
        smooth = [sum(losses[i - w : i]) / w for i in range(w, len(losses) + 1)]
        ax.plot(range(w, len(losses) + 1), smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross-entropy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_pairs(domain: str, holdout: int) -> list[tuple[str, str]]:
    """(user message, answer) pairs of a domain's training split."""
    from coe.adapters.experts.data import code_train, math_train

    probes = math_train(holdout) if domain == "math" else code_train()
    return [(p.query, p.reference) for p in probes]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coe.adapters.experts.data import encode_example
    from coe.model_paths import resolve

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    ckpt = args.ckpt or ROOT / "bench" / "results" / "tmp" / f"expert-{args.domain}"
    model_dir = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = training_pairs(args.domain, args.holdout)
    examples = [e for e in (encode_example(tok, q, a, args.max_len) for q, a in pairs) if e is not None]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    lcfg = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=args.targets.split(","),
        layers_to_transform=list(range(n_layers - args.top_layers, n_layers)) if args.top_layers else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record.update(model_dir=str(model_dir), n_examples=len(examples), n_pairs=len(pairs),
                  loss="mean answer-token cross-entropy", optimizer="AdamW(wd=0), grad-norm clip 1.0",
                  schedule="linear warm-up, cosine decay to 10% of lr")
    losses: list[float] = []
    start, wall_before = 0, 0.0
    stream = batches(examples, args.batch_size, rng)
    state_file = ckpt / "state.pt"
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        diff = {k: (state["args"][k], record[k]) for k in _SAME_ON_RESUME if state["args"].get(k) != record[k]}
        if diff:
            raise SystemExit(f"{ckpt}: checkpoint made with other arguments {diff}; use another --ckpt")
        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, losses, wall_before = state["step"], state["losses"], state["wall_s"]
        for _ in range(start):  # the same batch order as an uninterrupted run
            next(stream)
        print(f"resumed from {ckpt} at step {start}", flush=True)
    t0 = time.time()

    def save(step: int) -> None:
        wall = round(wall_before + time.time() - t0, 1)
        ckpt.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(ckpt)
        torch.save({"step": step, "losses": losses, "optimizer": opt.state_dict(), "wall_s": wall,
                    "torch_rng": torch.get_rng_state(), "args": record}, ckpt / "state.tmp")
        (ckpt / "state.tmp").replace(state_file)
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        record.update(steps_done=step, wall_s=wall)
        (args.out / "training_args.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "loss.json").write_text(json.dumps({"step_loss": losses}) + "\n")
        plot_loss(losses, args.out / "loss.png", f"LoRA {args.domain} expert on {args.model}")

    for step in range(start, args.steps):
        input_ids, mask, labels, keep = collate(next(stream), tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=keep).logits  # [B, keep, V]
        target = labels[:, -keep + 1 :]  # token t+1 is predicted at position t
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        print(f"step {step + 1}/{args.steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(step + 1)


if __name__ == "__main__":
    main()
