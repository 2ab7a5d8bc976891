"""The mixture engine: serves a ``kind: mixture`` expert (MoLE or X-LoRA over LoRA experts).

The base model runs in-process with transformers, on the CPU; the layer-wise mixing is
:mod:`coe.adapters.mole` / :mod:`coe.adapters.xlora` (KV-cached). Prompts go through the same
chat template code as the other engines (:mod:`coe.serving.engines.tokens`); requests are the
same :class:`~coe.serving.engines.rows.Row` s, sampled by the same sampler
(:func:`~coe.serving.engines.decode_batch.sample_rows`) and streamed through the same
:class:`~coe.serving.engines.rows.StreamBridge`.

Batches: ``generate_batch`` decodes its requests as one left-padded batch; ``stream`` runs a
batch of one. One batch runs at a time (the mixture keeps one KV cache), so the engine declares
``batching="window"``: the expert server collects requests for a short window and hands them
over together. The work happens in a worker thread so the asyncio loop stays free. A stream
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

from coe.errors import AdapterError, ConfigError, InvalidRequestError, NotReadyError
from coe.serving.engines.base import Capabilities, Engine, register_engine
from coe.serving.engines.decode_batch import row_error, sample_rows
from coe.serving.engines.loading import model_max_len, resolve_dtype
from coe.serving.engines.rows import Row, StreamBridge
from coe.serving.engines.tokens import check_context, encode_request, load_tokenizer, stop_ids
from coe.types import GenerationOutput, GenerationRequest, StreamDelta

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
        self._tokenizer = None
        self._lock = threading.Lock()
        self._max_len = self.config.max_model_len

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> MixtureEngine:
        """Build from ``spec.model`` and ``spec.mixture`` (ConfigError when the mixture is missing)."""
        if spec.mixture is None:
            raise ConfigError("the mixture engine needs `mixture` in its spec (a `kind: mixture` expert)")
        m = spec.mixture
        return cls(spec.model, spec.config, method=m.method, adapters=list(m.adapters),
                   checkpoint=m.checkpoint, top_k=m.top_k)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.mixture is None:
            await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from coe.adapters.mixtures import load_mixture
        from coe.adapters.mole import MoLE, read_mixture_meta
        from coe.models import resolve

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
        self.mixture = None

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def adapters(self) -> list[str]:
        return list(self.mixture.lora.names) if self.mixture is not None else []

    async def add_adapter(self, name: str, path) -> None:
        raise AdapterError("a mixture engine serves a fixed set of experts; adapters cannot be added at runtime")

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        if self._tokenizer is None:
            raise NotReadyError(f"mixture engine for {self.model_path} is not started")
        return encode_request(self._tokenizer, request)

    # ------------------------------------------------------------------ generation
    def _admit(self, request: GenerationRequest, sink) -> Row:
        if self.mixture is None:
            raise NotReadyError(f"mixture engine for {self.model_path} is not started")
        if request.adapter is not None:
            raise AdapterError("a mixture expert mixes its own adapters; requests cannot name one")
        if request.sampling.prompt_logprobs is not None:
            raise InvalidRequestError(
                "prompt_logprobs is not supported by the mixture engine (it keeps only the last position's "
                "logits); leave prompt_logprobs/echo out, or pin an expert served by the hf or vllm engine",
                param="prompt_logprobs",
            )
        ids = self.encode_prompt(request)
        check_context(len(ids), request.sampling.max_tokens, self.max_model_len)
        return Row.create(self._tokenizer, ids, request.sampling, device=DEVICE, sink=sink)

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

    async def stream(self, request: GenerationRequest):
        """Yield StreamDeltas (the last one has the finish reason and usage)."""
        bridge = StreamBridge()
        row = self._admit(request, bridge.emit)
        task = asyncio.get_running_loop().run_in_executor(None, self._run_safely, [row])
        try:
            async for delta in bridge.deltas():
                yield delta
        finally:
            row.cancelled = True
            await asyncio.shield(task)

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput | Exception]:
        """All requests decoded together as one batch; a request that fails gets its exception
        in its place (the others are served)."""
        outs: list[list[StreamDelta | BaseException]] = [[] for _ in requests]
        results: list[GenerationOutput | Exception | None] = [None] * len(requests)
        rows = []
        for i, req in enumerate(requests):
            try:
                rows.append(self._admit(req, outs[i].append))
            except Exception as err:  # noqa: BLE001  (this request only)
                results[i] = row_error(err)
        if rows:
            await asyncio.to_thread(self._run_safely, rows)
        for i, deltas in enumerate(outs):
            if results[i] is not None:
                continue
            if not deltas or isinstance(deltas[-1], BaseException):
                results[i] = row_error(deltas[-1]) if deltas else row_error(RuntimeError("no output"))
                continue
            results[i] = GenerationOutput.from_deltas(deltas)
        return results
