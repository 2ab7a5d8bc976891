"""Per-token decode time of a mixture over 4 adapters vs a single LoRA (and the base model).

    .venv/bin/python bench/lora_mixture.py [--batch 8 --prompt 32 --new 64 --rounds 5]

Random llama (``--preset``, default ``lora-cpu``), 4 random rank-16 LoRAs on
q/k/v/o/gate/up/down; all variants use the same KV-cached decode loop
(:mod:`coe.adapters.decode`), so the ratios isolate the mixing cost: base, one LoRA
(MultiLoRA), MoLE over 4 (dense), MoLE over 4 (top-2), X-LoRA over 4. ``--rounds``
interleaved rounds (order rotated, one warm-up round first); the ratio to one LoRA is taken
per round and summarised (median, range). A round where the base model is slower than base +
one LoRA breaks physics: it is counted in ``suspect_rounds`` and the run is flagged.
Target (issue 5): a mixture over 4 adapters ≤ 1.5x the per-token time of a single LoRA.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    from bench.lora_common import (
        add_model_args,
        load,
        random_llama,
        random_loras,
        shape_of,
        sync_of,
    )
    from bench.record import RunRecord, write_results
    from bench.stats import fmt, interleaved, paired_ratio, summary

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU; default torch's)")
    p.add_argument("--name", default=None, help="results file stem (default lora_mixture_<device>)")
    args = p.parse_args(argv)
    rec = RunRecord.start()

    import torch

    from coe.adapters.decode import decode
    from coe.adapters.mole import MoLE
    from coe.adapters.multilora import LoRAStepper, MultiLoRA
    from coe.adapters.xlora import XLoRA, XLoRAConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    shape, dev, dt = shape_of(args), args.device, args.dtype
    work = Path(tempfile.mkdtemp(prefix="mix-bench-"))
    random_llama(work / "base", shape)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    loras = random_loras(work / "base", work, 4, rank=16, targets=targets)
    experts = [(f"e{i}", path) for i, path in enumerate(loras)]
    ids = torch.randint(3, shape.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones_like(ids)

    def gates_random(mole):
        torch.manual_seed(0)
        with torch.no_grad():
            for g in mole.gates.values():
                g.weight.normal_(0, 0.5)
        return mole

    ml_base = MultiLoRA(load(work / "base", dev, dt))
    ml = MultiLoRA(load(work / "base", dev, dt))
    ml.add("e0", loras[0])
    xlora = XLoRA(load(work / "base", dev, dt), experts, XLoRAConfig(hidden_size=shape.hidden))
    xlora.classifier.to(dev)
    steppers = {
        "base": LoRAStepper(ml_base, [None] * args.batch),
        "single_lora": LoRAStepper(ml, ["e0"] * args.batch),
        "mole_4_dense": gates_random(MoLE(load(work / "base", dev, dt), experts)),
        "mole_4_top2": gates_random(MoLE(load(work / "base", dev, dt), experts, top_k=2)),
        "xlora_4": xlora,
    }
    runs = {
        k: (lambda st=st: [t for t, _ in decode(st, ids, mask, args.new, eos_ids=set(), pad_id=0)])
        for k, st in steppers.items()
    }
    with torch.no_grad():
        seconds = interleaved(runs, args.rounds, warmup=1, sync=sync_of(dev))
    ms_step = {k: summary([1000 * s / args.new for s in v]) for k, v in seconds.items()}
    vs_single = {k: paired_ratio(v, seconds["single_lora"]) for k, v in seconds.items()}
    suspect = sum(b > s for b, s in zip(seconds["base"], seconds["single_lora"]))
    res = rec.finish({
        "benchmark": "lora_mixture", "args": vars(args), "shape": shape.label(), "seconds": seconds,
        "ms_per_step": ms_step, "vs_single_lora": vs_single, "suspect_rounds": suspect,
        "valid": suspect == 0, "target": {"mixture_vs_single_lora_max": 1.5},
    })
    rows = "\n".join(f"| {k} | {fmt(ms_step[k], digits=1)} | {fmt(vs_single[k])} |" for k in ms_step)
    verdict = ("" if suspect == 0 else
               f"\n**Invalid run**: in {suspect} of {args.rounds} rounds the base model was slower than base + one "
               f"LoRA — the machine was disturbed; do not quote these figures.\n")
    md = rec.markdown_header(f"Mixture over 4 LoRAs vs one LoRA, per decode step ({dev})") + (
        f"Random {shape.label()}, vocab {shape.vocab}, {dt}; 4 rank-16 LoRAs on all linear layers; batch "
        f"{args.batch}, {args.prompt} prompt + {args.new} new tokens (time per step includes the prefill share); "
        f"{args.rounds} interleaved rounds after a warm-up round; median [min–max]; ratios per round.\n\n"
        f"| variant | ms / step | vs single LoRA (per round) |\n|---|---|---|\n{rows}\n{verdict}\n"
        f"Target: a mixture over 4 ≤ 1.5x a single LoRA. X-LoRA needs a second (base) pass per token by design.\n"
    )
    write_results(args.name or f"lora_mixture_{dev}", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
