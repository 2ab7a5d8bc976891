"""MiniLM cut to its first layers (layer pruning, no training): the speed side of the distilled embedder.

    python -m bench.pruned_layers [--layers 1,2,3] [--out ~/.cache/coe/pruned-variants]

Writes, per layer count k, ``OUT/minilm-lK-int8``: MiniLM's first k transformer layers exported
and quantised as ``minilm-l6-int8`` is (``coe.tools.models.export_onnx_embedder``). Measure them with
``bench/router_speed.py --embedders FOLDER,...`` (speed: QUIET; quality: deterministic).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--out", default=str(Path.home() / ".cache" / "coe" / "pruned-variants"))
    args = ap.parse_args()
    from transformers import AutoModel, AutoTokenizer

    from coe.tools.models import export_onnx_embedder, prepare

    teacher = prepare("minilm-l6", quiet=True)
    for k in (int(x) for x in args.layers.split(",")):
        with tempfile.TemporaryDirectory() as work:
            model = AutoModel.from_pretrained(str(teacher))
            model.encoder.layer = model.encoder.layer[:k]
            model.config.num_hidden_layers = k
            model.save_pretrained(work)
            AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(work)
            out = Path(args.out) / f"minilm-l{k}-int8"
            export_onnx_embedder(Path(work), out)
        print(out)


if __name__ == "__main__":
    main()
