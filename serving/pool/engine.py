"""The pool engine: several whole-model experts behind one Engine, served group by group.

``PoolEngine(experts, pool_config, engine_config)`` is the integration surface: ``experts``
maps expert id → model reference (alias, folder or hub id), requests name their expert in
``GenerationRequest.expert``. One worker thread serves *sessions*: it asks the
:class:`~coe.serving.pool.scheduler.GroupedQueue` for the next expert and its requests, leases the
expert from the :class:`~coe.serving.pool.pool.ExpertPool` (swapping it in if needed), starts
copying the expert scheduled after it (CUDA), and decodes the group as one batch with the
transformers engine's continuous batching (``HFEngine``'s prefill/decode steps, reused as they
are). At each step boundary more requests for the same expert join the running batch while
the policy would still choose this expert (so a request overdue for another expert stops the
admissions, and the session ends when its rows finish).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

from coe.config import EngineConfig, PoolConfig
from coe.errors import (
    EngineError,
    ExpertNotFoundError,
    InvalidRequestError,
    NotReadyError,
    available,
)
from coe.serving.engines.base import Engine, register_engine
from coe.serving.engines.chat import check_context, encode_request, model_max_len, stop_ids
from coe.serving.engines.hf import HFEngine, _Row
from coe.serving.engines.sampling import TextStream, make_generator
from coe.serving.pool.pool import ExpertPool
from coe.serving.pool.scheduler import GroupedQueue
from coe.types import GenerationRequest

if TYPE_CHECKING:
    from coe.config import CoEConfig


class _ExpertRunner(HFEngine):
    """HFEngine's batch state and decode steps for one pool expert; never started itself.

    The pool engine sets ``_model`` to the leased slot's model for the length of a session and
    drives ``_prefill`` / ``_decode`` / ``_drop_finished`` from its own worker thread.
    """

    def __init__(self, host, device: str, config: EngineConfig) -> None:
        super().__init__(host.path, config)
        self._tokenizer = host.tokenizer
        self._device = device
        self._eos, self._pad_id = stop_ids(list(host.eos_ids), host.tokenizer)
        self._max_len = model_max_len(host.path, config.max_model_len)


@register_engine("pool")
class PoolEngine(Engine):
    """Many whole-model experts on one device: host copies, M device slots, grouped batches.

    ``experts``: expert id → model reference. ``pool``: residency and scheduling
    (:class:`~coe.config.PoolConfig`); ``config``: device, dtype, ``max_num_seqs`` (the batch
    size of one session) and ``max_model_len``. ``stream`` raises ExpertNotFoundError when
    ``request.expert`` is missing or unknown; the other contracts are :class:`Engine`'s.
    """

    def __init__(self, experts: dict[str, str], pool: PoolConfig | None = None,
                 config: EngineConfig | None = None) -> None:
        if not experts:
            raise InvalidRequestError("the pool engine needs at least one expert")
        super().__init__(next(iter(experts.values())), config or EngineConfig(kind="hf"))
        self.experts = dict(experts)
        self.pool_config = pool or PoolConfig()
        self.pool: ExpertPool | None = None
        self._runners: dict[str, _ExpertRunner] = {}
        self._queue = GroupedQueue(self.pool_config.policy, self.pool_config.max_wait_ms, self.config.max_num_seqs)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.sessions: list[tuple[str, int]] = []  # (expert, rows served), for metrics and tests

    @classmethod
    def from_config(cls, config: CoEConfig) -> PoolEngine:
        """The pool of ``config``: every ``model`` expert with ``pooled: true``, ``serving.pool``.

        The engine settings (device, dtype, max_num_seqs, max_model_len) are the first pooled
        expert's. Raises ConfigError when ``serving.pool`` is unset or no expert qualifies.
        """
        from coe.errors import ConfigError

        if config.serving.pool is None:
            raise ConfigError("serving.pool is not set: there is no expert pool to build")
        pooled = [e for e in config.experts if e.kind == "model" and e.pooled]
        if not pooled:
            raise ConfigError("serving.pool is set but no `model` expert has `pooled: true`")
        return cls({e.id: e.model for e in pooled}, config.serving.pool, pooled[0].engine)

    @classmethod
    def from_spec(cls, spec) -> PoolEngine:
        """The pool of an expert server's spec (``coe.serving.deployments.spec.ServerSpec`` with ``pooled``)."""
        from coe.serving.deployments.spec import resolve_model

        experts = {e.id: resolve_model(e.model, spec.base_dir) for e in spec.pooled}
        return cls(experts, spec.pool, spec.pooled[0].engine)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load every expert into host memory (and pinned ones onto the device); start the worker."""
        if self._thread is not None:
            return
        await asyncio.to_thread(self._load)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pool-engine", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        from coe.models import resolve

        pool = ExpertPool({e: str(resolve(ref)) for e, ref in self.experts.items()}, self.pool_config, self.config)
        pool.load()
        self._runners = {e: _ExpertRunner(pool.host[e], pool.device, self.config) for e in pool.experts()}
        self.pool = pool

    async def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._cond:
            waiting = self._queue.take_all()
        for row in waiting:
            row.emit(NotReadyError("the engine was stopped"))
        self.pool, self._runners = None, {}

    async def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        """A snapshot for metrics: residency (LRU first), swap counters, queue, sessions served."""
        pool = self.pool
        if pool is None:
            return {"started": False}
        st = pool.stats
        return {
            "started": True,
            "device": pool.device,
            "swapping": pool.swapping,
            "resident": pool.resident_experts(),
            "slot_bytes": pool.slot_bytes(),
            "hits": st.hits,
            "swaps": st.swaps,
            "prefetches": st.prefetches,
            "evictions": st.evictions,
            "bytes_swapped": st.bytes_swapped,
            "queued": self.queued(),
            "sessions": len(self.sessions),
        }

    def queued(self) -> dict[str, int]:
        """Requests waiting per expert (for metrics and tests)."""
        with self._cond:
            return self._queue.groups()

    # ------------------------------------------------------------------ requests

    def _runner(self, request: GenerationRequest) -> _ExpertRunner:
        if self.pool is None:
            raise NotReadyError("the pool engine is not started")
        if request.expert is None or request.expert not in self._runners:
            raise ExpertNotFoundError(
                f"request {request.request_id!r} names expert {request.expert!r}; this pool serves: "
                f"{available(self._runners)}",
                param="expert",
            )
        return self._runners[request.expert]

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        return encode_request(self._runner(request)._tokenizer, request)

    def max_len_of(self, expert: str) -> int:
        """Context window of one expert (the configured one, capped by the model's)."""
        if expert not in self._runners:
            raise ExpertNotFoundError(f"unknown expert {expert!r}; this pool serves: {available(self._runners)}")
        return self._runners[expert].max_model_len

    async def stream(self, request: GenerationRequest):
        """Yield StreamDeltas once the request's expert is scheduled; errors come before the first."""
        runner = self._runner(request)
        if self._thread is None:
            raise NotReadyError("the pool engine is not started")
        prompt_ids = encode_request(runner._tokenizer, request)
        params = request.sampling
        check_context(len(prompt_ids), params.max_tokens, runner.max_model_len)
        row = _Row(
            prompt_ids=prompt_ids,
            params=params,
            adapter=None,
            generator=make_generator(params.seed, self.pool.device),
            text=TextStream(runner._tokenizer, prompt_ids, params.stop),
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
        )
        with self._cond:
            self._queue.put(request.expert, row)
            self._cond.notify()
        try:
            while True:
                item = await row.queue.get()
                if isinstance(item, BaseException):
                    if isinstance(item, EngineError):
                        raise item
                    raise EngineError(f"generation failed: {type(item).__name__}: {item}") from item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            row.cancelled = True  # queued: dropped when taken; running: dropped at the next step

    # ------------------------------------------------------------------ worker thread

    def _next(self) -> tuple[str, list[_Row]] | None:
        """Block until a group is ready; None when stopping. Cancelled rows are skipped."""
        with self._cond:
            while True:
                self._queue.remove_if(lambda r: r.cancelled)
                if self._stopping:
                    return None
                if len(self._queue):
                    return self._queue.next_batch(time.monotonic(), self.pool.resident_experts())
                self._cond.wait()

    def _more(self, expert: str, room: int) -> list[_Row]:
        """Rows for ``expert`` that may join its running batch now (see the module docstring)."""
        with self._cond:
            self._queue.remove_if(lambda r: r.cancelled)
            if room <= 0 or self._queue.choose(time.monotonic(), self.pool.resident_experts()) != expert:
                return []
            return self._queue.take(expert, room)

    def _prefetch_next(self, current: str) -> None:
        if not self.pool_config.prefetch or self.pool.device != "cuda":
            return
        with self._cond:
            nxt = self._queue.choose(time.monotonic(), self.pool.resident_experts())
        if nxt is not None and nxt != current:
            self.pool.prefetch(nxt)

    def _run(self) -> None:
        while True:
            batch = self._next()
            if batch is None:
                return
            expert, rows = batch
            try:
                self._session(expert, rows)
            except Exception as err:  # noqa: BLE001  (one failing session must not kill the engine)
                runner = self._runners[expert]
                for row in set(runner._rows) | set(rows):
                    if not row.done:
                        row.emit(err)
                runner._rows, runner._batch = [], None

    def _session(self, expert: str, rows: list[_Row]) -> None:
        import torch

        runner = self._runners[expert]
        served = len(rows)
        with self.pool.lease(expert) as model, torch.inference_mode():
            runner._model = model
            self._prefetch_next(expert)
            try:
                runner._prefill(rows)
                runner._drop_finished()
                while runner._rows and not self._stopping:
                    more = self._more(expert, self.config.max_num_seqs - len(runner._rows))
                    if more:
                        served += len(more)
                        runner._prefill(more)
                    else:
                        runner._decode()
                    runner._drop_finished()
            finally:
                runner._model = None
        if self._stopping:
            for row in runner._rows:
                row.emit(NotReadyError("the engine was stopped"))
            runner._rows, runner._batch = [], None
        self.sessions.append((expert, served))
