"""Variants of the tuned static embedder (``minilm-l6-m2v-tuned``), chosen on train data only.

Each variant (``dims:epochs:learning_rate``) is tuned on the same local corpus and teacher
embeddings (computed once) and saved as a model2vec folder under ``--out-models/<name>``, ready for
``bench/router_speed.py --embedders <folder>``. The rule that picks one: the lowest held-out
cosine distance to MiniLM's own embedding (the last 10% of the corpus, in MiniLM's full space, so
it compares across widths); the test splits play no part. Run under the heavy lock:

    flock /tmp/coe-heavy.lock .venv/bin/python bench/static_tune_variants.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--variants", default="256:10:1e-3,384:10:1e-3", help="dims:epochs:lr, comma-separated")
    ap.add_argument("--work", default="/tmp/coe-static-tune", help="cache of the teacher targets and the base")
    ap.add_argument("--out-models", default=None, help="default: $COE_HOME/models/../static-tune-variants")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "static_tune_variants.json"))
    args = ap.parse_args()

    import torch
    from model2vec import StaticModel
    from model2vec.distill import distill

    from coe.paths import models_dir
    from coe.routers.embedders import MARKER, load_backend
    from coe.routers.static_tune import collect_corpus, corpus_sha256, tune
    from coe.tools.models import MINILM_MAX_SEQ, prepare

    torch.set_num_threads(2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_models = Path(args.out_models or models_dir().parent / "static-tune-variants")
    teacher = prepare("minilm-l6", quiet=True)
    texts = collect_corpus(Path(args.corpus))
    sha = corpus_sha256(texts)
    timings = {}
    cached = work / f"targets-{sha[:16]}.npy"
    t = time.perf_counter()
    if cached.is_file():
        targets = np.load(cached)
    else:
        targets = load_backend(str(teacher), max_seq_length=MINILM_MAX_SEQ, threads=2).encode(texts, 64)
        np.save(cached, targets)
    timings["teacher_s"] = time.perf_counter() - t
    print(f"{len(texts):,} texts, teacher {timings['teacher_s']:.0f} s", flush=True)
    t = time.perf_counter()
    if (work / "base384" / "config.json").is_file():
        base = StaticModel.from_pretrained(str(work / "base384"))
    else:
        base = distill(model_name=str(teacher), pca_dims=None)
        base.save_pretrained(str(work / "base384"))
    timings["distill_s"] = time.perf_counter() - t
    rows = []
    for spec in args.variants.split(","):
        dims, epochs, lr = spec.split(":")
        name = f"m2v-tuned-d{dims}-e{epochs}-lr{lr}"
        t = time.perf_counter()
        model, res = tune(base, texts, targets, dims=int(dims), epochs=int(epochs), learning_rate=float(lr))
        folder = out_models / name
        model.save_pretrained(str(folder))
        (folder / MARKER).write_text(json.dumps({"backend": "model2vec"}))
        row = {"name": name, "folder": str(folder), "dims": int(dims), "epochs": int(epochs), "lr": float(lr),
               "train_texts": res.texts, "val_texts": res.val_texts, "val_cosine_loss_before": res.val_loss_before,
               "val_cosine_loss_after": res.val_loss_after, "tune_s": time.perf_counter() - t}
        print(json.dumps(row), flush=True)
        rows.append(row)
    best = min(rows, key=lambda r: r["val_cosine_loss_after"])
    result = {"corpus": args.corpus, "corpus_texts": len(texts), "corpus_sha256": sha, **timings,
              "rule": "lowest held-out cosine distance to MiniLM (10% of the train corpus)", "chosen": best["name"],
              "variants": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"chosen: {best['name']}")


if __name__ == "__main__":
    main()
