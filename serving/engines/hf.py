"""The transformers engine: one model in-process (CPU or CUDA), continuous batching, multi-LoRA.

Requests are decoded together by one background worker thread: each loop iteration either
prefills the newly arrived requests (as their own left-padded batch, then joined to the
running one) or runs one decode step over every active row (see ``hf_batch`` for the cache
layout). Tokens go back to each caller's asyncio loop through a per-request queue.
A mixed batch of LoRA adapters is one forward through :class:`coe.adapters.multilora.MultiLoRA`
(``_forward``): every loaded adapter's A/B matrices are concatenated per layer and each row's
adapter is selected by a mask, so a batch mixing 8 adapters costs two extra GEMMs per layer
instead of peft's per-adapter loop (``bench/lora_mixed_batch.py``: 2.7x peft's tokens/s on CPU).

Thread-safety: the public coroutines may be called from any asyncio loop; the model is only
touched under ``_model_lock`` (by the worker, and by adapter loading).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field

from coe.errors import AdapterError, EngineError, NotReadyError
from coe.serving.engines.adapter_check import LoraInfo, validate_lora_adapter
from coe.serving.engines.base import Engine, register_engine
from coe.serving.engines.chat import (
    check_context,
    encode_request,
    load_tokenizer,
    model_load_error,
    model_max_len,
    resolve_device,
    resolve_dtype,
    stop_ids,
)
from coe.serving.engines.hf_batch import KVBatch, left_pad
from coe.serving.engines.sampling import TextStream, accept_token, make_generator, sample_token
from coe.types import GenerationRequest, SamplingParams


@dataclass(eq=False)
class _Row:
    """One request in flight (owned by the worker thread once admitted)."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    generator: object
    text: TextStream
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False

    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            self.cancelled = True


@register_engine("hf")
class HFEngine(Engine):
    """transformers ``AutoModelForCausalLM`` with batched decoding and mixed multi-LoRA batches."""

    def __init__(self, model_path, config=None) -> None:
        super().__init__(model_path, config)
        self._model = None
        self._tokenizer = None
        self._device = "cpu"
        self._max_len = self.config.max_model_len
        self._eos: set[int] = set()
        self._adapters: dict[str, tuple[str, LoraInfo]] = {}  # name -> (name in MultiLoRA, info)
        self._lora = None  # coe.adapters.multilora.MultiLoRA, created with the first adapter
        self._pending: collections.deque[_Row] = collections.deque()
        self._rows: list[_Row] = []
        self._batch: KVBatch | None = None
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"hf-engine-{self.model_path}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from coe.models import resolve

        path = resolve(self.model_path)
        self._device = resolve_device(self.config)
        dtype = resolve_dtype(self.config, self._device, engine="hf")
        if self._device == "cpu" and self.config.cpu_threads is not None:
            torch.set_num_threads(self.config.cpu_threads)  # process-wide, by request of the config
        self._tokenizer = load_tokenizer(path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as err:
            raise model_load_error(path, err) from None
        self._model = model.to(self._device).eval()
        self._max_len = model_max_len(path, self.config.max_model_len)
        self._eos, self._pad_id = stop_ids(model.generation_config.eos_token_id, self._tokenizer)

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        for row in list(self._pending) + self._rows:
            row.emit(NotReadyError("the engine was stopped"))
        self._pending.clear()
        self._rows, self._batch, self._model = [], None, None

    async def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def running(self) -> int:
        """Requests admitted or waiting (for tests and metrics)."""
        return len(self._rows) + len(self._pending)

    # ------------------------------------------------------------------ requests

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        if self._tokenizer is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        return encode_request(self._tokenizer, request)

    async def stream(self, request: GenerationRequest):
        """Yield StreamDeltas; raises ContextLengthError / AdapterError before the first one."""
        if self._thread is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        prompt_ids = self.encode_prompt(request)
        params = request.sampling
        check_context(len(prompt_ids), params.max_tokens, self.max_model_len)
        if request.adapter is not None and request.adapter not in self._adapters:
            raise AdapterError(f"unknown adapter {request.adapter!r}; added: {sorted(self._adapters) or '(none)'}")
        row = _Row(
            prompt_ids=prompt_ids,
            params=params,
            adapter=request.adapter,
            generator=make_generator(params.seed, self._device),
            text=TextStream(self._tokenizer, prompt_ids, params.stop),
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
        )
        with self._cond:
            self._pending.append(row)
            self._cond.notify()
        try:
            while True:
                item = await row.queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, (EngineError, AdapterError)):
                        raise item
                    raise EngineError(f"generation failed: {type(item).__name__}: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            row.cancelled = True  # a no-op once finished; otherwise the worker drops the row
            with self._cond:
                self._cond.notify()

    # ------------------------------------------------------------------ adapters

    async def add_adapter(self, name: str, path) -> None:
        info = validate_lora_adapter(path, self.config.max_lora_rank)
        if self._model is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        await asyncio.to_thread(self._load_adapter, name, info)

    def _load_adapter(self, name: str, info: LoraInfo) -> None:
        from coe.adapters.multilora import MultiLoRA

        with self._model_lock:
            if name in self._adapters:
                raise AdapterError(f"adapter {name!r} is already added (from {self._adapters[name][1].path})")
            try:
                if self._lora is None:
                    self._lora = MultiLoRA(self._model)
                self._lora.add(name, info.path)
            except AdapterError as err:
                raise AdapterError(f"adapter {info.path} does not fit model {self.model_path}: {err}") from None
            except Exception as err:  # noqa: BLE001  (unreadable weights and the like)
                raise AdapterError(
                    f"adapter {info.path} does not fit model {self.model_path}: {type(err).__name__}: {str(err)[:300]}"
                ) from None
            self._adapters[name] = (name, info)

    async def remove_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._unload_adapter, name)

    def _unload_adapter(self, name: str) -> None:
        with self._model_lock:
            if name not in self._adapters:
                return
            with self._cond:
                busy = sum(r.adapter == name for r in list(self._pending) + self._rows if not r.cancelled)
            if busy:
                raise AdapterError(f"adapter {name!r} is serving {busy} request(s); remove it when they finish")
            self._adapters.pop(name)
            self._lora.remove(name)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    # ------------------------------------------------------------------ worker thread

    def _run(self) -> None:
        import torch

        while True:
            with self._cond:
                while not self._stopping and not self._pending and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    return
                room = self.config.max_num_seqs - len(self._rows)
                new = []
                while self._pending and len(new) < room:
                    row = self._pending.popleft()
                    if not row.cancelled:
                        new.append(row)
            try:
                with self._model_lock, torch.inference_mode():
                    if new:
                        self._prefill(new)
                    elif self._rows:
                        self._decode()
                    self._drop_finished()
            except Exception as err:  # noqa: BLE001  (one failing batch must not kill the engine)
                for row in self._rows + [r for r in new if r not in self._rows]:
                    row.emit(err)
                self._rows, self._batch = [], None

    def _forward(self, input_ids, mask, positions, cache, adapters: list[str | None]):
        """Last-position logits ``[B, V]``; the one place LoRA is applied (mixed multi-LoRA batch)."""
        import contextlib

        use_lora = self._lora is not None and any(a is not None for a in adapters)
        with self._lora.batch(adapters) if use_lora else contextlib.nullcontext():
            out = self._model(
                input_ids=input_ids.to(self._device),
                attention_mask=mask.to(self._device),
                position_ids=positions.to(self._device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _prefill(self, new: list[_Row]) -> None:
        from transformers import DynamicCache

        gone = [r for r in new if r.adapter is not None and r.adapter not in self._adapters]
        for row in gone:  # removed between the request's check and its admission
            row.emit(AdapterError(f"adapter {row.adapter!r} was removed"))
        new = [r for r in new if r not in gone]
        if not new:
            return
        ids, mask, positions = left_pad([r.prompt_ids for r in new], self._pad_id)
        cache = DynamicCache()  # no config: full layers only (see hf_batch)
        logits = self._forward(ids, mask, positions, cache, [r.adapter for r in new])  # [n, V]
        part = KVBatch(cache, mask.to(self._device))
        if self._batch is None:
            self._batch = part
        else:
            self._batch.join(part)
        self._rows.extend(new)
        for row, row_logits in zip(new, logits):
            self._accept(row, sample_token(row_logits, row.params, row.generator))

    def _decode(self) -> None:
        import torch

        tokens = torch.tensor([[r.generated[-1]] for r in self._rows], dtype=torch.long)  # [B, 1]
        positions = torch.tensor([[len(r.prompt_ids) + len(r.generated) - 1] for r in self._rows])  # [B, 1]
        mask = self._batch.grow()  # [B, T+1]
        logits = self._forward(tokens, mask, positions, self._batch.cache, [r.adapter for r in self._rows])
        for row, row_logits in zip(self._rows, logits):
            self._accept(row, sample_token(row_logits, row.params, row.generator))

    def _accept(self, row: _Row, token: int) -> None:
        if not row.cancelled:
            row.emit(accept_token(row, token, self._eos))

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not (r.done or r.cancelled)]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._batch = None
        else:
            self._batch.keep(keep)
