"""Does ``learned`` gain from hashed character n-grams (``text_dim``)? Cross-validation on train only.

For each dev set (the train side of ``coe eval``'s split), 5-fold CV AIQ of ``learned`` over its
usual grid (l2 × shrink) against the same grid with ``text_dim`` ∈ {256, 1024} and
``text_weight`` ∈ {0.5, 1.0}. Prints the two best CV AIQs and the per-fold differences; writes
``bench/results/router_text_features_cv.json``. Test splits are never read.

    python bench/router_text_features_cv.py [mbpp winograde gsm8k mtbench profiles]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

D = "../shared/data/routing/"
R = "bench/results/"
SETS = {   # name -> (train file, split fraction or None, cost table or None), as in README's Results
    "mbpp": (D + "mbpp_train.csv", None, None),
    "winograde": (D + "winograde_train.csv", None, None),
    "gsm8k": (D + "routellm_gsm8k_responses.csv", 0.7, R + "router_eval_gsm8k/costs.json"),
    "mtbench": (D + "mt_bench_judgements.jsonl", 0.7, R + "router_eval_mtbench/costs.json"),
    "profiles": ("configs/profiles/default_likelihood.jsonl", 0.7, None),
}
BASE_GRID = {"l2": [1.0, 3.0, 10.0, 30.0, 100.0], "shrink": [0.25, 0.5, 0.75, 1.0]}
TEXT_GRID = {**BASE_GRID, "text_dim": [256, 1024], "text_weight": [0.5, 1.0]}


def main(names: list[str]) -> None:
    from coe.routers.datasets import embed_routing_data, load_routing_data
    from coe.routers.embedding import Embedder
    from coe.routers.report import split_data
    from coe.routers.tuning import cross_validate

    emb = Embedder("minilm-l6", disk_cache=True, progress=False)
    out = {}
    for name in names or list(SETS):
        path, split, costs = SETS[name]
        data = load_routing_data(path, "auto", costs)
        if split:
            data, _ = split_data(data, split, 0)
        x, _, _ = embed_routing_data(emb, data, None)
        t = time.time()
        plain = cross_validate("learned", data, x, grid=BASE_GRID, folds=5, seed=0)
        text = cross_validate("learned", data, x, grid=TEXT_GRID, folds=5, seed=0)
        d = np.array(text.fold_scores) - np.array(plain.fold_scores)
        out[name] = {"rows": len(data), "plain": {"params": plain.params, "cv_aiq": plain.score, "folds": plain.fold_scores},
                     "text": {"params": text.params, "cv_aiq": text.score, "folds": text.fold_scores}}
        print(f"{name} rows {len(data)}: plain CV {plain.score:.4f} {plain.params} | text CV {text.score:.4f} "
              f"{text.params} | diff {text.score - plain.score:+.4f} folds {np.round(d, 4).tolist()} "
              f"({time.time() - t:.0f} s)", flush=True)
    Path(R, "router_text_features_cv.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
