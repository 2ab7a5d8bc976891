"""Embedding backends: how a model folder turns texts into unit-norm vectors.

One small protocol, :class:`EmbeddingBackend` (``dim`` and ``encode``), and self-registering
backends:

- ``sentence-transformers``: the model in PyTorch (float32, or bfloat16 when the folder asks);
- ``onnx``: an ONNX Runtime session over a graph that already mean-pools and normalises (what
  ``coe models prepare minilm-l6-int8`` exports and quantises), tokenised with ``tokenizers``;
- ``model2vec``: a static embedder (one vector per token, averaged), distilled from MiniLM.

A prepared folder names its backend in ``coe_embedder.json`` (``{"backend": ..., options}``);
a folder without one is read as model2vec when its ``config.json`` says so, else as a
sentence-transformers model. Heavy libraries are imported when a backend is built.
:class:`coe.routers.embedding.Embedder` adds batching, truncation and caches on top.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from coe.errors import ConfigError, available
from coe.plugins import Plugins

MARKER = "coe_embedder.json"


class EmbeddingBackend(Protocol):
    """Turns texts into ``[len(texts), dim]`` float32 unit-norm rows, in input order.

    ``encode`` is called under the owning :class:`Embedder`'s lock (one call at a time);
    ``threads`` (constructor) caps the intra-op threads where the library allows it.
    """

    dim: int

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray: ...


BackendFactory = Callable[..., EmbeddingBackend]
_BACKENDS: Plugins[BackendFactory] = Plugins("embedding backend", stamp_name=False)


def register_backend(name: str):
    """Decorator: register an embedding backend factory ``(path, max_seq_length, threads, **options)``."""
    return _BACKENDS.register(name)


def backend_names() -> list[str]:
    return _BACKENDS.names()


def folder_spec(path: str) -> dict[str, Any]:
    """The backend spec of a model folder (or hub id): ``{"backend": name, **options}``."""
    folder = Path(path)
    marker = folder / MARKER
    if marker.is_file():
        try:
            spec = json.loads(marker.read_text())
        except ValueError as err:
            raise ConfigError(f"{marker}: not valid JSON ({err}); re-run `coe models prepare --force`") from None
        if not isinstance(spec, dict) or "backend" not in spec:
            raise ConfigError(f"{marker}: needs a 'backend' key; available: {available(backend_names())}")
        return spec
    config = folder / "config.json"
    if config.is_file():
        try:
            if json.loads(config.read_text()).get("model_type") == "model2vec":
                return {"backend": "model2vec"}
        except ValueError:
            pass
    return {"backend": "sentence-transformers"}


def load_backend(path: str, *, max_seq_length: int | None, threads: int | None = None) -> EmbeddingBackend:
    """Build the backend that ``path`` declares. :class:`ConfigError` names an unknown backend."""
    spec = dict(folder_spec(path))
    name = spec.pop("backend")
    try:
        factory = _BACKENDS.get(name)
    except ConfigError as err:
        raise ConfigError(f"embedder {path}: {err}") from None
    return factory(path, max_seq_length=max_seq_length, threads=threads, **spec)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- backends


@register_backend("sentence-transformers")
class TorchBackend:
    """A sentence-transformers model in PyTorch; ``dtype: bfloat16`` casts its weights."""

    def __init__(self, path: str, *, max_seq_length: int | None, threads: int | None = None,
                 dtype: str = "float32") -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"embedder {path}: dtype {dtype!r}; allowed: float32, bfloat16")
        if threads:
            torch.set_num_threads(threads)
        model = SentenceTransformer(path, device="cpu")
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
        if dtype == "bfloat16":
            model = model.to(torch.bfloat16)
        self.model = model
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(get())

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        import torch

        with torch.inference_mode():
            vecs = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                     convert_to_tensor=True, show_progress_bar=False)
        return _unit(vecs.float().numpy())


@register_backend("onnx")
class OnnxBackend:
    """ONNX Runtime over a graph ``(input_ids, attention_mask, token_type_ids) -> [B, D]`` unit rows."""

    def __init__(self, path: str, *, max_seq_length: int | None, threads: int | None = None,
                 file: str = "model.onnx", dim: int | None = None) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        folder = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(folder / file), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.no_padding()
        if max_seq_length is not None:
            tok.enable_truncation(max_length=max_seq_length)
        self.tokenizer = tok
        self.dim = int(dim) if dim else int(self.encode(["dimension probe"], 1).shape[1])

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        encs = self.tokenizer.encode_batch(texts)
        out: np.ndarray | None = None
        order = np.argsort([len(e.ids) for e in encs], kind="stable")   # similar lengths share a batch
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encs[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)              # [b, T], zero-padded
            mask = np.zeros_like(ids)
            types = np.zeros_like(ids)
            for row, i in enumerate(idx):
                e = encs[i]
                n = len(e.ids)
                ids[row, :n], mask[row, :n], types[row, :n] = e.ids, e.attention_mask, e.type_ids
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            vecs = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]   # [b, D]
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[idx] = vecs
        if out is None:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _unit(out)


@register_backend("model2vec")
class StaticBackend:
    """A model2vec static embedder: token vectors averaged, no transformer at query time."""

    def __init__(self, path: str, *, max_seq_length: int | None, threads: int | None = None) -> None:
        from model2vec import StaticModel

        self.model = StaticModel.from_pretrained(path)
        self.max_length = max_seq_length
        self.dim = int(self.model.dim)

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        vecs = self.model.encode(texts, batch_size=max(batch_size, 1), max_length=self.max_length,
                                 show_progress_bar=False, use_multiprocessing=False)
        return _unit(vecs)
