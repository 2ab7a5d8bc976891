"""The mixture engine: serves a ``kind: mixture`` expert (MoLE or X-LoRA over LoRA experts).

The base model runs in-process with transformers, on the CPU; the layer-wise mixing is
:mod:`coe.adapters.mole` / :mod:`coe.adapters.xlora` (KV-cached). Prompts go through the same
chat template code as the other engines (:mod:`coe.serving.engines.tokens`); requests are the
same :class:`~coe.serving.engines.rows.Row` s, sampled by the same sampler
(:func:`~coe.serving.engines.decode_batch.sample_rows`) and streamed through the same
:class:`~coe.serving.engines.rows.StreamBridge`.

Batches: one batch runs at a time (the mixture keeps one KV cache), so the engine keeps a
batching window (:class:`~coe.serving.engines.window.ExpertGroupedBatcher`, ``window`` of its
spec: ``serving.batching``) in front of it: the streams that arrive within the window are
decoded as one left-padded batch, in a worker thread so the asyncio loop stays free. A stream
closed early stops its batch row; a batch whose rows are all gone stops. A request that fails
(a bad seed, a context overflow) fails alone; the other requests of its batch are served.

Device: the mixture runs on the CPU whatever ``engine.device`` says (its LoRA and gate tensors
are not placed on an accelerator); a config asking for ``cuda`` gets a warning.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from coe.config import BatchingConfig
from coe.errors import AdapterError, ConfigError, InvalidRequestError, NotReadyError
from coe.serving.engines.base import Capabilities, Engine, register_engine
from coe.serving.engines.decode_batch import row_error, sample_rows
from coe.serving.engines.loading import model_max_len, resolve_dtype
from coe.serving.engines.rows import Row, StreamBridge
from coe.serving.engines.tokens import load_tokenizer, stop_ids
from coe.serving.engines.window import ExpertGroupedBatcher
from coe.types import Dispatch

if TYPE_CHECKING:
    from coe.serving.engines.spec import EngineSpec

log = logging.getLogger("coe.serving")
DEVICE = "cpu"


@register_engine("mixture")
class MixtureEngine(Engine):
    """One base model plus one MoLE / X-LoRA mixture over its LoRA experts (CPU)."""

    capabilities = Capabilities(batching="window")

    def __init__(
        self,
        model_path,
        config=None,
        *,
        method: str = "mole",
        adapters: list[tuple[str, str | Path]] | None = None,
        checkpoint: str | Path | None = None,
        top_k: int | None = None,
        window: BatchingConfig | None = None,
    ) -> None:
        super().__init__(model_path, config)
        if method not in ("mole", "xlora"):
            raise ConfigError(f"mixture method {method!r} is unknown; allowed: mole, xlora")
        if checkpoint is None and method == "xlora":
            raise ConfigError("an xlora mixture needs a `checkpoint` (its trained scalings classifier)")
        if checkpoint is None and len(adapters or []) < 2:
            raise ConfigError("a mixture without a checkpoint needs at least 2 adapters")
        if self.config.device == "cuda":
            log.warning("the mixture engine for %s runs on the CPU; engine.device 'cuda' is not used", model_path)
        self.method, self.adapter_paths = method, list(adapters or [])
        self.checkpoint, self.top_k = checkpoint, top_k
        self.mixture = None
        self._lock = threading.Lock()
        self._max_len = self.config.max_model_len
        self.set_window(window or BatchingConfig())

    def set_window(self, window: BatchingConfig) -> None:
        """Collect requests for ``window`` from now on (a benchmark compares windows on one loaded
        engine). One batch runs at a time: the mixture has one KV cache."""
        self.window = ExpertGroupedBatcher(self._run_batch, max_batch_size=window.max_batch_size,
                                           window_ms=window.window_ms, max_concurrent=1)

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> MixtureEngine:
        """Build from ``spec.model`` and ``spec.mixture`` (ConfigError when the mixture is missing)."""
        if spec.mixture is None:
            raise ConfigError("the mixture engine needs `mixture` in its spec (a `kind: mixture` expert)")
        m = spec.mixture
        return cls(spec.model, spec.config, method=m.method, adapters=list(m.adapters),
                   checkpoint=m.checkpoint, top_k=m.top_k, window=m.window)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.mixture is None:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from coe.adapters.mixtures import load_mixture
        from coe.adapters.mole import MoLE, read_mixture_meta
        from coe.model_paths import resolve

        path = resolve(self.model_path)
        self._tokenizer = load_tokenizer(path)
        dtype = resolve_dtype(self.config, DEVICE, engine="hf")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        if self.checkpoint is not None:
            kind = read_mixture_meta(self.checkpoint).get("kind")
            if kind != self.method:
                raise ConfigError(f"checkpoint {self.checkpoint} holds a {kind!r} mixture, the config says {self.method!r}")
            self.mixture = load_mixture(self.checkpoint, model)
            if self.top_k is not None and hasattr(self.mixture, "top_k"):
                self.mixture.top_k = self.top_k
        else:  # untrained gates: the uniform mixture of the experts
            self.mixture = MoLE(model, self.adapter_paths, top_k=self.top_k)
        self._max_len = model_max_len(path, self.config.max_model_len)
        self._eos, self._pad_id = stop_ids(model.generation_config.eos_token_id, self._tokenizer)

    async def stop(self) -> None:
        await self.window.close()
        self.mixture = None

    def stats(self) -> dict:
        """The window's queue: requests waiting for a batch, batches run."""
        return {"queue_depth": self.window.queue_depth(), "batches": self.window.batches_dispatched}

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def adapters(self) -> list[str]:
        return list(self.mixture.lora.names) if self.mixture is not None else []

    async def add_adapter(self, name: str, path) -> None:
        raise AdapterError("a mixture engine serves a fixed set of experts; adapters cannot be added at runtime")

    # ------------------------------------------------------------------ generation
    def _admit(self, dispatch: Dispatch, sink) -> Row:
        if self.mixture is None:
            raise NotReadyError(f"mixture engine for {self.model_path} is not started")
        if dispatch.adapter is not None:
            raise AdapterError("a mixture expert mixes its own adapters; requests cannot name one")
        if dispatch.sampling.prompt_logprobs is not None:
            raise InvalidRequestError(
                "prompt_logprobs is not supported by the mixture engine (it keeps only the last position's "
                "logits); leave prompt_logprobs/echo out, or pin an expert served by the hf or vllm engine",
                param="prompt_logprobs",
            )
        return Row.create(self._tokenizer, self.prompt_ids(dispatch), dispatch.sampling, device=DEVICE, sink=sink)

    def _run(self, rows: list[Row]) -> None:
        """Decode ``rows`` as one batch (worker thread); each row's output goes to its sink."""
        import torch

        from coe.serving.engines.kv_batch import left_pad

        with self._lock, torch.no_grad():
            ids, mask, _ = left_pad([r.prompt_ids for r in rows], self._pad_id)  # [B, T]
            stepper = self.mixture
            stepper.reset()
            logits = stepper.forward(ids, mask)  # [B, V]
            while True:
                sample_rows(rows, logits, self._eos)
                if all(r.finished for r in rows):
                    return
                tokens = [r.generated[-1] if not r.finished else self._pad_id for r in rows]
                live = torch.tensor([not r.finished for r in rows], dtype=mask.dtype)
                mask = torch.cat([mask, live.unsqueeze(1)], dim=1)  # [B, T+1]
                logits = stepper.forward(torch.tensor(tokens).unsqueeze(1), mask)

    def _run_safely(self, rows: list[Row]) -> None:
        try:
            self._run(rows)
        except Exception as err:  # noqa: BLE001  (handed to every waiting caller)
            for r in rows:
                r.fail(row_error(err))

    async def _run_batch(self, _key: str, rows: list[Row]) -> list[None]:
        """The window's batch: ``rows`` decoded together (each row's output goes to its stream)."""
        live = [r for r in rows if not r.cancelled]
        if live:
            await asyncio.to_thread(self._run_safely, live)
        return [None] * len(rows)

    async def stream(self, dispatch: Dispatch):
        """Yield StreamDeltas (the last one has the finish reason and usage); the request waits
        in the window and is decoded with the others of its batch."""
        bridge = StreamBridge()
        row = self._admit(dispatch, bridge.emit)
        batch = asyncio.ensure_future(self.window.submit(dispatch.expert or "mixture", row))

        def failed(done: asyncio.Future) -> None:  # the window itself failed: this stream must end
            if not done.cancelled() and done.exception() is not None:
                row.fail(row_error(done.exception()))

        batch.add_done_callback(failed)
        try:
            async for delta in bridge.deltas():
                yield delta
        finally:
            row.cancelled = True  # waiting: leaves the window; decoding: its batch drops the row
            batch.cancel()
