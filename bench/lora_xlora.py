"""X-LoRA generation: PEFT's X-LoRA (no KV cache) vs ours (two KV caches), same mixture.

    .venv/bin/python bench/lora_xlora.py [--prompt 128 --new 128 --batch 1 --rounds 3]

A random llama (``--preset``, default ``lora-cpu``), ``--adapters`` random rank-16 LoRAs on
every linear layer, a random X-LoRA classifier (peft's, copied into ours with
``XLoRA.from_peft``). Greedy, fixed length, ``--rounds`` interleaved rounds after a warm-up
round. Reports tokens/s (median, range), the per-round speed-up (median, range), the first new
token's logits difference and whether the greedy tokens agree.
Target (issue 5): ≥ 5x PEFT with the same first-token logits.
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
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU; default torch's)")
    p.add_argument("--name", default=None, help="results file stem (default lora_xlora_<device>)")
    args = p.parse_args(argv)
    rec = RunRecord.start()

    import torch
    from peft import XLoraConfig, get_peft_model

    from coe.adapters.decode import decode
    from coe.adapters.xlora import XLoRA

    if args.threads:
        torch.set_num_threads(args.threads)
    shape, dev, dt = shape_of(args), args.device, args.dtype
    work = Path(tempfile.mkdtemp(prefix="xlora-bench-"))
    random_llama(work / "base", shape)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    loras = random_loras(work / "base", work, args.adapters, rank=16, targets=targets)
    base = load(work / "base", dev, dt)
    base.config.use_cache = False
    xcfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=shape.hidden, xlora_depth=1,
                       adapters={str(i): str(p) for i, p in enumerate(loras)})
    torch.manual_seed(3)
    pm = get_peft_model(base, xcfg).to(dev).eval()
    with torch.no_grad():
        for prm in pm.base_model.internal_xlora_classifier.parameters():
            prm.normal_(0, 0.1)
    ours = XLoRA.from_peft(pm, load(work / "base", dev, dt))
    ours.classifier.to(dev)
    ids = torch.randint(3, shape.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones_like(ids)
    tokens = args.batch * args.new
    out: dict[str, torch.Tensor] = {}

    def run_ours():
        out["ours"] = torch.stack([t for t, _ in decode(ours, ids, mask, args.new, eos_ids=set(), pad_id=0)], 1)

    def run_peft():
        gen = pm.generate(input_ids=ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                          pad_token_id=0)
        out["peft"] = gen[:, args.prompt:]

    with torch.no_grad():
        want = pm(input_ids=ids).logits[:, -1].float()
        ours.reset()
        got = ours.forward(ids, mask).float()
        seconds = interleaved({"ours_kv_cache": run_ours, "peft_xlora": run_peft}, args.rounds, warmup=1,
                              sync=sync_of(dev))
    toks_ours, toks_peft = out["ours"].cpu(), out["peft"].cpu()
    agree = float((toks_ours == toks_peft).float().mean())
    first_diverge = int((toks_ours != toks_peft).any(0).float().argmax()) if agree < 1 else None
    tps = {k: summary([tokens / s for s in v]) for k, v in seconds.items()}
    speedup = paired_ratio(seconds["peft_xlora"], seconds["ours_kv_cache"])
    res = rec.finish({
        "benchmark": "lora_xlora", "args": vars(args), "shape": shape.label(), "seconds": seconds,
        "tokens_per_s": tps, "speedup": speedup, "target": {"speedup": 5.0},
        "first_token_logits_max_abs_diff": float((got - want).abs().max()),
        "greedy_token_agreement": agree, "first_divergent_position": first_diverge,
    })
    md = rec.markdown_header(f"X-LoRA generation with a KV cache vs PEFT's X-LoRA ({dev})") + (
        f"Random {shape.label()}, vocab {shape.vocab}, {dt}; {args.adapters} rank-16 LoRAs on all linear layers; "
        f"classifier depth 1; batch {args.batch}, {args.prompt} prompt + {args.new} new tokens, greedy; "
        f"{args.rounds} interleaved rounds after a warm-up round; median [min–max].\n\n"
        f"| | PEFT X-LoRA (use_cache=False) | ours (two KV caches) |\n|---|---|---|\n"
        f"| new tokens/s | {fmt(tps['peft_xlora'])} | {fmt(tps['ours_kv_cache'])} |\n\n"
        f"- speed-up per round: **{fmt(speedup, digits=1)}x** (target ≥ 5x)\n"
        f"- first new token's logits, max |diff|: {res['first_token_logits_max_abs_diff']:.2e}\n"
        f"- greedy tokens identical: {agree:.1%}\n"
    )
    write_results(args.name or f"lora_xlora_{dev}", res, md)
    print(md)
    return res


if __name__ == "__main__":
    main()
