"""The transformers engine: one model in-process (CPU or CUDA), continuous batching, multi-LoRA.

Requests are decoded together by one background worker thread over a
:class:`~coe.serving.engines.decode_batch.DecodeBatch`: each loop iteration either admits the
newly arrived requests (prefilled as their own left-padded batch, then joined to the running
one) or runs one decode step over every active row. Tokens go back to each caller's asyncio
loop through its :class:`~coe.serving.engines.rows.StreamBridge`.
A mixed batch of LoRA adapters is one forward through :class:`coe.adapters.multilora.MultiLoRA`
(:meth:`HFEngine.forward`): every loaded adapter's A/B matrices are concatenated per layer and
each row's adapter is selected by a mask, so a batch mixing 8 adapters costs two extra GEMMs per
layer instead of peft's per-adapter loop (``bench/lora_mixed_batch.py``: 2.7x peft's tokens/s on CPU).

Thread-safety: the public coroutines may be called from any asyncio loop; the model is only
touched under ``_model_lock`` (by the worker, and by adapter loading).
"""

from __future__ import annotations

import asyncio
import collections
import threading

from coe.errors import AdapterError, NotReadyError
from coe.serving.engines.adapter_check import LoraInfo, validate_lora_adapter
from coe.serving.engines.base import Capabilities, Engine, register_engine
from coe.serving.engines.decode_batch import DecodeBatch, row_error
from coe.serving.engines.loading import (
    model_load_error,
    model_max_len,
    resolve_device,
    resolve_dtype,
)
from coe.serving.engines.rows import Row, StreamBridge
from coe.serving.engines.tokens import load_tokenizer, stop_ids
from coe.types import Dispatch


@register_engine("hf")
class HFEngine(Engine):
    """transformers ``AutoModelForCausalLM`` with batched decoding and mixed multi-LoRA batches."""

    capabilities = Capabilities(batching="continuous", runtime_adapters=True)

    def __init__(self, model_path, config=None) -> None:
        super().__init__(model_path, config)
        self._model = None
        self._device = "cpu"
        self._max_len = self.config.max_model_len
        self._adapters: dict[str, LoraInfo] = {}
        self._lora = None  # coe.adapters.multilora.MultiLoRA, created with the first adapter
        self._pending: collections.deque[Row] = collections.deque()
        self._batch: DecodeBatch | None = None
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

        from coe.model_paths import resolve

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
        eos, pad_id = stop_ids(model.generation_config.eos_token_id, self._tokenizer)
        self._batch = DecodeBatch(self.forward, eos=eos, pad_id=pad_id, device=self._device)

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        stopped = NotReadyError("the engine was stopped")
        if self._batch is not None:
            self._batch.fail(stopped, list(self._pending))
        self._pending.clear()
        self._batch, self._model = None, None

    async def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def running(self) -> int:
        """Requests admitted or waiting (for tests and metrics)."""
        with self._cond:
            return (len(self._batch) if self._batch is not None else 0) + len(self._pending)

    # ------------------------------------------------------------------ requests

    async def stream(self, dispatch: Dispatch):
        """Yield StreamDeltas; raises ContextLengthError / AdapterError / InvalidRequestError
        (an unusable seed) before the first one."""
        if self._thread is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        prompt_ids = self.prompt_ids(dispatch)
        params = dispatch.sampling
        if dispatch.adapter is not None and dispatch.adapter not in self._adapters:
            raise AdapterError(f"unknown adapter {dispatch.adapter!r}; added: {sorted(self._adapters) or '(none)'}")
        bridge = StreamBridge()
        row = await _maybe_off_loop(params.response_format is not None, Row.create, self._tokenizer, prompt_ids,
                                    params, device=self._device, sink=bridge.emit, adapter=dispatch.adapter)
        with self._cond:
            self._pending.append(row)
            self._cond.notify()
        try:
            async for delta in bridge.deltas():
                yield delta
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
                raise AdapterError(f"adapter {name!r} is already added (from {self._adapters[name].path})")
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
            self._adapters[name] = info

    async def remove_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._unload_adapter, name)

    def _unload_adapter(self, name: str) -> None:
        with self._model_lock:
            if name not in self._adapters:
                return
            with self._cond:
                rows = list(self._pending) + (self._batch.rows if self._batch is not None else [])
                busy = sum(r.adapter == name for r in rows if not r.cancelled)
            if busy:
                raise AdapterError(f"adapter {name!r} is serving {busy} request(s); remove it when they finish")
            self._adapters.pop(name)
            self._lora.remove(name)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    # ------------------------------------------------------------------ worker thread

    def forward(self, input_ids, mask, positions, cache, adapters: list[str | None], all_logits: bool = False):
        """Last-position logits ``[B, V]`` (every position's ``[B, T, V]`` with ``all_logits``): the
        :class:`DecodeBatch` forward, the one place LoRA is applied (a mixed multi-LoRA batch).
        Call with ``_model_lock`` held (the worker does)."""
        import contextlib

        use_lora = self._lora is not None and any(a is not None for a in adapters)
        with self._lora.batch(adapters) if use_lora else contextlib.nullcontext():
            out = self._model(
                input_ids=input_ids.to(self._device),
                attention_mask=mask.to(self._device),
                position_ids=positions.to(self._device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,  # 0: every position
            )
        return out.logits if all_logits else out.logits[:, -1, :]

    def _run(self) -> None:
        import torch

        batch = self._batch
        while True:
            with self._cond:
                while not self._stopping and not self._pending and not batch.rows:
                    self._cond.wait()
                if self._stopping:
                    return
                room = self.config.max_num_seqs - len(batch)
                new = []
                while self._pending and len(new) < room:
                    row = self._pending.popleft()
                    if not row.cancelled:
                        new.append(row)
            try:
                with self._model_lock, torch.inference_mode():
                    if new:
                        batch.admit(self._check_adapters(new))
                    else:
                        batch.step()
                    batch.drop_finished()
            except Exception as err:  # noqa: BLE001  (a failing shared step must not kill the engine)
                batch.fail(row_error(err), new)

    def _check_adapters(self, new: list[Row]) -> list[Row]:
        """Fail the rows whose adapter was removed between their check and their admission."""
        for row in new:
            if row.adapter is not None and row.adapter not in self._adapters:
                row.fail(AdapterError(f"adapter {row.adapter!r} was removed"))
        return [r for r in new if not r.finished]


async def _maybe_off_loop(off: bool, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, in a worker thread when ``off`` (a grammar to compile must not block the loop)."""
    return await asyncio.to_thread(fn, *args, **kwargs) if off else fn(*args, **kwargs)
