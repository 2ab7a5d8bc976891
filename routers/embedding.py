"""Sentence embeddings for routing: batched, cached in memory and on disk, any backend.

The model comes from :func:`coe.model_paths.resolve` (built-in alias ``minilm-l6`` by default); the
folder says which :mod:`coe.routers.embedders` backend runs it (PyTorch sentence-transformers,
ONNX Runtime int8, or a model2vec static embedder). Embeddings are unit-norm ``float32`` rows, so a dot product is the cosine similarity. The
caches are keyed by the model folder and the SHA-256 of the text: an in-process LRU, and an
SQLite file under ``$COE_HOME/embeddings/`` so that re-running an evaluation does not embed
the same texts again.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _build_id(path: str) -> str:
    """What tells two builds of one prepared folder apart (its manifest: checksums of every file),
    so a rebuilt model (``coe models prepare --force``) never reads the old model's cached
    embeddings; empty for a folder without one (a hub id or a user's folder)."""
    from coe.model_paths import READY

    try:
        return hashlib.sha256((Path(path) / READY).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""

class Embedder:
    """Thread-safe sentence embedder.

    ``encode(texts)`` returns ``[len(texts), dim]`` float32, unit-norm. Texts already seen are
    served from the caches (``memory_items=0`` turns the memory cache off); the rest are embedded
    in batches of ``batch_size``. ``disk_cache`` persists them (off by default for the online
    path, where a write per query costs more than it saves). ``threads`` caps the backend's
    intra-op threads (default: the library's own choice).
    """

    def __init__(
        self,
        model: str = "minilm-l6",
        *,
        batch_size: int = 64,
        max_seq_length: int | None = 256,
        disk_cache: bool = False,
        memory_items: int = 50_000,
        progress: bool = False,
        threads: int | None = None,
    ) -> None:
        from coe.model_paths import resolve

        self.ref = model
        self.path = resolve(model)
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.progress = progress
        self.threads = threads
        self._backend = None
        self._lock = threading.RLock()
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_items = memory_items
        self._db: sqlite3.Connection | None = None
        self.model_key = hashlib.sha256(f"{self.path}|{max_seq_length}|{_build_id(self.path)}".encode()).hexdigest()[:16]
        self.embedded = 0   # texts actually run through the model (for tests and reports)
        if disk_cache:
            self._open_disk_cache()

    # -- model ------------------------------------------------------------------------------
    def _load(self):
        with self._lock:
            if self._backend is None:
                from coe.routers.embedders import load_backend

                self._backend = load_backend(self.path, max_seq_length=self.max_seq_length, threads=self.threads)
            return self._backend

    @property
    def backend(self) -> str:
        """The backend name the model folder declares (``onnx``, ``model2vec``, ``sentence-transformers``)."""
        from coe.routers.embedders import folder_spec

        return str(folder_spec(self.path)["backend"])

    @property
    def dim(self) -> int:
        return int(self._load().dim)

    # -- caches -----------------------------------------------------------------------------
    def _open_disk_cache(self) -> None:
        from coe.paths import coe_home

        folder = coe_home() / "embeddings"
        folder.mkdir(parents=True, exist_ok=True)
        self.disk_path = folder / f"{Path(self.path).name}-{self.model_key}.sqlite"
        self._db = sqlite3.connect(self.disk_path, check_same_thread=False, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        self._db.commit()

    def _remember(self, key: str, vec: np.ndarray) -> None:
        if self._memory_items <= 0:
            return
        self._memory[key] = vec
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_items:
            self._memory.popitem(last=False)

    def _from_disk(self, keys: list[str]) -> dict[str, np.ndarray]:
        if self._db is None or not keys:
            return {}
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, blob in self._db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})", chunk):
                found[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def _to_disk(self, items: list[tuple[str, np.ndarray]]) -> None:
        if self._db is None or not items:
            return
        self._db.executemany(
            "INSERT OR REPLACE INTO emb (key, vec) VALUES (?, ?)",
            [(k, np.asarray(v, dtype=np.float32).tobytes()) for k, v in items],
        )
        self._db.commit()

    # -- API --------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings ``[len(texts), dim]`` (float32), in input order."""
        return self.encode_tracked(texts)[0]

    def encode_tracked(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings [N, D], cached [N] bool)``: ``cached[i]`` is True when text ``i`` came from
        a cache (or repeats an earlier text of this call) rather than from the model."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), np.zeros(0, dtype=bool)
        keys = [text_key(t) for t in texts]
        with self._lock:
            out: dict[str, np.ndarray] = {}
            for k in keys:
                if k in self._memory:
                    out[k] = self._memory[k]
                    self._memory.move_to_end(k)
            missing = list(dict.fromkeys(k for k in keys if k not in out))
            for k, v in self._from_disk(missing).items():
                out[k] = v
                self._remember(k, v)
            todo = [k for k in missing if k not in out]
            fresh_keys = set(todo)
            if todo:
                first = {k: t for k, t in zip(keys, texts)}
                vecs = self._embed([first[k] for k in todo])
                fresh = list(zip(todo, vecs))
                for k, v in fresh:
                    out[k] = v
                    self._remember(k, v)
                self._to_disk(fresh)
            cached = np.ones(len(keys), dtype=bool)
            for i, k in enumerate(keys):
                if k in fresh_keys:
                    cached[i] = False
                    fresh_keys.discard(k)   # a repeat within the call is served from the first
            return np.stack([out[k] for k in keys]).astype(np.float32, copy=False), cached

    def _embed(self, texts: list[str]) -> np.ndarray:
        backend = self._load()
        if self.max_seq_length is not None:
            # The question comes last in few-shot prompts: keep the tail, not the head, of text
            # that cannot fit the window (about 4 characters per token).
            budget = 4 * self.max_seq_length
            texts = [t[-budget:] if len(t) > budget else t for t in texts]
        if self.progress and len(texts) > self.batch_size:
            from tqdm.auto import tqdm

            parts = []
            for start in tqdm(range(0, len(texts), self.batch_size), desc="embedding", unit="batch", leave=False):
                parts.append(backend.encode(texts[start : start + self.batch_size], self.batch_size))
            vecs = np.concatenate(parts)
        else:
            vecs = backend.encode(texts, self.batch_size)
        self.embedded += len(texts)
        return np.asarray(vecs, dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


_SHARED: dict[tuple, Embedder] = {}
_SHARED_LOCK = threading.Lock()


def get_embedder(model: str = "minilm-l6", *, disk_cache: bool = False, progress: bool = False,
                 threads: int | None = None) -> Embedder:
    """One shared :class:`Embedder` per (model, disk_cache, threads) in this process."""
    key = (model, disk_cache, threads)
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = Embedder(model, disk_cache=disk_cache, progress=progress, threads=threads)
        emb = _SHARED[key]
        emb.progress = progress
        return emb
