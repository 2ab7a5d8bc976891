"""X-LoRA generation: PEFT's X-LoRA (no KV cache) vs ours (two KV caches), same mixture.

    .venv/bin/python bench/lora_xlora.py [--prompt 128 --new 128 --batch 1]

A random llama, ``--adapters`` random rank-16 LoRAs on every linear layer, a random X-LoRA
classifier (peft's, copied into ours with ``XLoRA.from_peft``). Greedy, fixed length. Reports
tokens/s, the speed-up, the first new token's logits difference and whether the greedy tokens
agree. Target (issue 5): ≥ 5x PEFT with the same first-token logits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="lora_xlora_cpu")
    args = p.parse_args()

    import torch
    from peft import XLoraConfig, get_peft_model

    from bench.lora_common import load, machine, random_llama, random_loras, timed, write
    from coe.adapters.decode import decode
    from coe.adapters.xlora import XLoRA

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="xlora-bench-"))
    random_llama(work / "base", hidden=args.hidden, layers=args.layers, inter=args.hidden * 8 // 3, vocab=args.vocab)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    loras = random_loras(work / "base", work, args.adapters, rank=16, targets=targets)
    base = load(work / "base")
    base.config.use_cache = False
    xcfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=args.hidden, xlora_depth=1,
                       adapters={str(i): str(p) for i, p in enumerate(loras)})
    torch.manual_seed(3)
    pm = get_peft_model(base, xcfg).eval()
    with torch.no_grad():
        for prm in pm.base_model.internal_xlora_classifier.parameters():
            prm.normal_(0, 0.1)
    ours = XLoRA.from_peft(pm, load(work / "base"))
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    tokens = args.batch * args.new

    with torch.no_grad():
        want = pm(input_ids=ids).logits[:, -1]
        ours.reset()
        got = ours.forward(ids, mask)

        def run_ours():
            return torch.stack([t for t, _ in decode(ours, ids, mask, args.new, eos_ids=set(), pad_id=0)], 1)

        def run_peft():
            out = pm.generate(input_ids=ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
            return out[:, args.prompt :]

        run_ours()  # warm-up
        t_ours, toks_ours = timed(run_ours)
        t_peft, toks_peft = timed(run_peft)
    agree = float((toks_ours == toks_peft).float().mean())
    first_diverge = int((toks_ours != toks_peft).any(0).float().argmax()) if agree < 1 else None
    res = {
        "machine": machine(),
        "args": vars(args),
        "tokens_per_s": {"ours_kv_cache": tokens / t_ours, "peft_xlora": tokens / t_peft},
        "seconds": {"ours_kv_cache": t_ours, "peft_xlora": t_peft},
        "speedup": t_peft / t_ours,
        "first_token_logits_max_abs_diff": float((got - want).abs().max()),
        "greedy_token_agreement": agree,
        "first_divergent_position": first_diverge,
    }
    md = (
        f"# X-LoRA generation with a KV cache vs PEFT's X-LoRA ({res['machine']['date']})\n\n"
        f"Random llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; {args.adapters} rank-16 LoRAs on all "
        f"linear layers; classifier depth 1; batch {args.batch}, {args.prompt} prompt + {args.new} new tokens, greedy; "
        f"{args.threads} threads on a shared 2-core CPU (load average {res['machine']['load_avg_at_start']:.1f} at start).\n\n"
        f"| | PEFT X-LoRA (use_cache=False) | ours (two KV caches) |\n|---|---|---|\n"
        f"| new tokens/s | {res['tokens_per_s']['peft_xlora']:.2f} | {res['tokens_per_s']['ours_kv_cache']:.2f} |\n\n"
        f"- speed-up: **{res['speedup']:.1f}x** (target ≥ 5x)\n"
        f"- first new token's logits, max |diff|: {res['first_token_logits_max_abs_diff']:.2e}\n"
        f"- greedy tokens identical: {agree:.1%}\n"
    )
    write(args.name, res, md)


if __name__ == "__main__":
    main()
