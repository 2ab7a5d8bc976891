"""Train one LoRA expert on SmolLM2-135M-Instruct (CPU, peft), reproducibly.

    .venv/bin/python -m coe.adapters.experts.train --domain math --out adapters/experts/math
    .venv/bin/python -m coe.adapters.experts.train --domain code --out adapters/experts/code

Data (the team's shared folder, see :mod:`coe.adapters.experts.data`):

* ``math``: GSM8K train questions → reference answers (calculator annotations ``<<...>>``
  stripped, ``#### N`` kept). The last ``--holdout`` lines of the file are never trained on;
  the evaluation uses them.
* ``code``: MBPP prompts from the RouteLLM routing set → a model answer judged correct
  (gpt-4's when correct, else the first correct one). ``mbpp_test.csv`` is held out.

Each example is the chat-formatted conversation (the model's own template, default system
prompt included, as the engines will render it); the loss covers only the assistant answer
tokens and the closing ``<|im_end|>``. Sequences are left-padded so that every answer ends at
the last position and only the last ``max_answer + 1`` positions go through the LM head.

Writes into ``--out``: the PEFT adapter (``adapter_model.safetensors``, ``adapter_config.json``),
``training_args.json`` (every argument, the seed, data sizes, wall time), ``loss.json`` and
``loss.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--domain", choices=["math", "code"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m-instruct", help="coe.models.resolve reference")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument(
        "--top-layers",
        type=int,
        default=0,
        help="adapt only the last N decoder layers (0: all); backward then stops at the first adapted layer",
    )
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--holdout", type=int, default=300, help="math: last N GSM8K lines kept out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save-every", type=int, default=50)
    return p.parse_args(argv)


def _batches(examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random):
    """Endless shuffled batches of (token ids, answer length)."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[j] for j in order[i : i + batch_size]]


def _collate(batch, pad_id: int):
    """Left-pad; labels are -100 except on the answer tokens (shifted by the loss below)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    keep = max(n for _, n in batch) + 1
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for r, (ids, n) in enumerate(batch):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        mask[r, width - len(ids) :] = 1
        labels[r, width - n :] = torch.tensor(ids[-n:])
    return input_ids, mask, labels, keep


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coe.adapters.experts.data import code_train, encode_example, math_train
    from coe.models import resolve

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model_dir = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = math_train(args.holdout) if args.domain == "math" else code_train()
    examples = [encode_example(tok, q, a, args.max_len) for q, a in pairs]
    examples = [e for e in examples if e is not None]

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    lcfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets.split(","),
        layers_to_transform=(
            list(range(n_layers - args.top_layers, n_layers)) if args.top_layers else None
        ),
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
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    args.out.mkdir(parents=True, exist_ok=True)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record.update(model_dir=str(model_dir), n_examples=len(examples), n_pairs=len(pairs))
    losses: list[float] = []
    t0 = time.time()
    batches = _batches(examples, args.batch_size, rng)

    def save(step: int) -> None:
        model.save_pretrained(args.out)
        record.update(steps_done=step, wall_s=round(time.time() - t0, 1))
        (args.out / "training_args.json").write_text(json.dumps(record, indent=2) + "\n")
        (args.out / "loss.json").write_text(json.dumps({"step_loss": losses}) + "\n")
        plot_loss(losses, args.out / "loss.png", f"LoRA {args.domain} expert on {args.model}")

    for step in range(args.steps):
        input_ids, mask, labels, keep = _collate(next(batches), tok.pad_token_id)
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
        if (step + 1) % args.save_every == 0:
            save(step + 1)
    save(args.steps)


if __name__ == "__main__":
    main()
