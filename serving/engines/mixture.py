"""The mixture engine: serves a ``kind: mixture`` expert (MoLE or X-LoRA over LoRA experts).

The base model runs in-process with transformers; the layer-wise mixing is
:mod:`coe.adapters.mole` / :mod:`coe.adapters.xlora` (KV-cached). Prompts go through the same chat
template code as the other engines (``coe.serving.engines.chat``), tokens through the same
sampling and incremental detokenisation (``coe.serving.engines.sampling``).

Batches: ``generate_batch`` decodes its requests as one left-padded batch; ``stream`` runs a
batch of one. One batch runs at a time (the mixture keeps one KV cache); the work happens in a
worker thread so the asyncio loop stays free. A stream closed early stops its batch row; a
batch whose rows are all gone stops.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from coe.errors import AdapterError, ConfigError, EngineError, NotReadyError
from coe.serving.engines.base import Engine, register_engine
from coe.serving.engines.chat import (
    check_context,
    encode_request,
    load_tokenizer,
    model_max_len,
    resolve_dtype,
    stop_ids,
)
from coe.serving.engines.sampling import TextStream, accept_token, make_generator, sample_token
from coe.types import GenerationOutput, GenerationRequest, StreamDelta


class _Row:
    def __init__(self, prompt_ids, params, tokenizer, emit) -> None:
        self.prompt_ids, self.params, self.emit = prompt_ids, params, emit
        self.generator = make_generator(params.seed, "cpu")
        self.text = TextStream(tokenizer, prompt_ids, params.stop)
        self.generated: list[int] = []
        self.done = False
        self.cancelled = False


@register_engine("mixture")
class MixtureEngine(Engine):
    """One base model plus one MoLE / X-LoRA mixture over its LoRA experts (CPU or CUDA)."""

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
        self.method, self.adapter_paths = method, list(adapters or [])
        self.checkpoint, self.top_k = checkpoint, top_k
        self.mixture = None
        self._tokenizer = None
        self._lock = threading.Lock()
        self._max_len = self.config.max_model_len

    @classmethod
    def from_spec(cls, spec) -> MixtureEngine:
        """Build from a ``coe.serving.deployments.spec.ServerSpec`` whose host is a mixture expert."""
        from coe.serving.deployments.spec import resolve_model, resolve_path

        host, base = spec.host, spec.model_expert
        paths = {lora.id: str(resolve_path(lora.adapter, spec.base_dir)) for lora in spec.loras}
        return cls(
            resolve_model(base.model, spec.base_dir),
            base.engine,
            method=host.method,
            adapters=[(a, paths[a]) for a in host.adapters],
            checkpoint=str(resolve_path(host.checkpoint, spec.base_dir)) if host.checkpoint else None,
            top_k=host.top_k,
        )

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
        dtype = resolve_dtype(self.config, "cpu", engine="hf")
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
    def _admit(self, request: GenerationRequest, emit) -> _Row:
        if self.mixture is None:
            raise NotReadyError(f"mixture engine for {self.model_path} is not started")
        if request.adapter is not None:
            raise AdapterError("a mixture expert mixes its own adapters; requests cannot name one")
        ids = self.encode_prompt(request)
        check_context(len(ids), request.sampling.max_tokens, self.max_model_len)
        return _Row(ids, request.sampling, self._tokenizer, emit)

    def _run(self, rows: list[_Row]) -> None:
        """Decode ``rows`` as one batch (worker thread); each row's deltas go to its ``emit``."""
        import torch

        from coe.serving.engines.hf_batch import left_pad

        with self._lock, torch.no_grad():
            ids, mask, _ = left_pad([r.prompt_ids for r in rows], self._pad_id)
            stepper = self.mixture
            stepper.reset()
            logits = stepper.forward(ids, mask)  # [B, V]
            while True:
                tokens = []
                for r, row_logits in zip(rows, logits):
                    if r.done or r.cancelled:
                        tokens.append(self._pad_id)
                        continue
                    tok = sample_token(row_logits, r.params, r.generator)
                    tokens.append(tok)
                    self._accept(r, tok)
                if all(r.done or r.cancelled for r in rows):
                    return
                live = torch.tensor([not (r.done or r.cancelled) for r in rows], dtype=mask.dtype)
                mask = torch.cat([mask, live.unsqueeze(1)], dim=1)
                logits = stepper.forward(torch.tensor(tokens).unsqueeze(1), mask)

    def _accept(self, row: _Row, token: int) -> None:
        row.emit(accept_token(row, token, self._eos))

    async def stream(self, request: GenerationRequest):
        """Yield StreamDeltas (the last one has the finish reason and usage)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:
                row.cancelled = True

        row = self._admit(request, emit)
        task = loop.run_in_executor(None, self._run_safely, [row])
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            row.cancelled = True
            await asyncio.shield(task)

    def _run_safely(self, rows: list[_Row]) -> None:
        try:
            self._run(rows)
        except Exception as err:  # noqa: BLE001  (handed to every waiting caller)
            wrapped = err if isinstance(err, EngineError) else EngineError(f"mixture generation failed: {type(err).__name__}: {err}")
            for r in rows:
                if not r.done:
                    r.done = True
                    r.emit(wrapped)

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """All requests decoded together as one batch."""
        outs: list[list[StreamDelta | BaseException]] = [[] for _ in requests]
        rows = [self._admit(req, outs[i].append) for i, req in enumerate(requests)]
        await asyncio.to_thread(self._run_safely, rows)
        results = []
        for deltas in outs:
            if deltas and isinstance(deltas[-1], BaseException):
                raise deltas[-1]
            last = deltas[-1]
            results.append(GenerationOutput(
                text="".join(d.text for d in deltas), finish_reason=last.finish_reason or "stop",
                prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens,
                token_ids=[t for d in deltas for t in d.token_ids],
            ))
        return results
