"""Per-token decode time of a mixture over 4 adapters vs a single LoRA (and the base model).

    .venv/bin/python bench/lora_mixture.py [--batch 8 --prompt 32 --new 64]

Random llama, 4 random rank-16 LoRAs on q/k/v/o/gate/up/down; all variants use the same
KV-cached decode loop (:mod:`coe.adapters.decode`), so the ratios isolate the mixing cost:
base, one LoRA (MultiLoRA), MoLE over 4 (dense), MoLE over 4 (top-2), X-LoRA over 4.
Target (issue 5): a mixture over 4 adapters ≤ 1.5x the per-token time of a single LoRA.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="lora_mixture_cpu")
    args = p.parse_args()

    import torch

    from bench.lora_common import load, machine, random_llama, random_loras, timed, write
    from coe.adapters.decode import decode
    from coe.adapters.mole import MoLE
    from coe.adapters.multilora import LoRAStepper, MultiLoRA
    from coe.adapters.xlora import XLoRA, XLoRAConfig

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="mix-bench-"))
    random_llama(work / "base", hidden=args.hidden, layers=args.layers, inter=args.hidden * 8 // 3, vocab=args.vocab)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    loras = random_loras(work / "base", work, 4, rank=16, targets=targets)
    experts = [(f"e{i}", path) for i, path in enumerate(loras)]
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def gates_random(mole):
        torch.manual_seed(0)
        with torch.no_grad():
            for g in mole.gates.values():
                g.weight.normal_(0, 0.5)
        return mole

    base_model = load(work / "base")
    ml_base = MultiLoRA(base_model)
    single_model = load(work / "base")
    ml = MultiLoRA(single_model)
    ml.add("e0", loras[0])
    steppers = {
        "base": LoRAStepper(ml_base, [None] * args.batch),
        "single_lora": LoRAStepper(ml, ["e0"] * args.batch),
        "mole_4_dense": gates_random(MoLE(load(work / "base"), experts)),
        "mole_4_top2": gates_random(MoLE(load(work / "base"), experts, top_k=2)),
        "xlora_4": XLoRA(load(work / "base"), experts, XLoRAConfig(hidden_size=args.hidden)),
    }
    seconds = {k: float("inf") for k in steppers}
    runs = {
        k: (lambda st=st: [t for t, _ in decode(st, ids, mask, args.new, eos_ids=set(), pad_id=0)])
        for k, st in steppers.items()
    }
    with torch.no_grad():
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeat):  # interleaved, best of each: the machine's load drifts
            for name, run in runs.items():
                t, _ = timed(run)
                seconds[name] = min(seconds[name], t)
    per_token_ms = {k: 1000 * v / args.new for k, v in seconds.items()}
    ratio = {k: v / per_token_ms["single_lora"] for k, v in per_token_ms.items()}
    res = {"machine": machine(), "args": vars(args), "ms_per_step": per_token_ms, "vs_single_lora": ratio}
    rows = "\n".join(f"| {k} | {per_token_ms[k]:.1f} | {ratio[k]:.2f} |" for k in per_token_ms)
    md = (
        f"# Mixture over 4 LoRAs vs one LoRA, per decode step ({res['machine']['date']})\n\n"
        f"Random llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; 4 rank-16 LoRAs on all linear "
        f"layers; batch {args.batch}, {args.prompt} prompt + {args.new} new tokens (time per step includes the prefill "
        f"share); best of {args.repeat} interleaved runs; {args.threads} threads on a shared 2-core CPU (load average "
        f"{res['machine']['load_avg_at_start']:.1f} at start).\n\n"
        f"| variant | ms / step | vs single LoRA |\n|---|---|---|\n{rows}\n\n"
        f"Target: a mixture over 4 ≤ 1.5x a single LoRA. X-LoRA needs a second (base) pass per token by design.\n"
    )
    write(args.name, res, md)


if __name__ == "__main__":
    main()
