"""The pool engine: several whole-model experts behind one Engine, served group by group.

``PoolEngine(experts, pool_config, engine_config)`` (or ``PoolEngine.from_spec``): ``experts``
maps expert id → model reference (alias, folder or hub id), requests name their expert in
``Dispatch.expert``. One worker thread serves *sessions*: it asks the
:class:`~coe.serving.pool.scheduler.GroupedQueue` for the next expert and its requests, leases the
expert from the :class:`~coe.serving.pool.pool.ExpertPool` (swapping it in if needed), starts
copying the expert scheduled after it (CUDA), and decodes the group with the one decode core
(:class:`~coe.serving.engines.decode_batch.DecodeBatch` over the leased model). At each step
boundary more requests for the same expert join the running batch while the policy would
still choose this expert (so a request overdue for another expert stops the admissions, and
the session ends when its rows finish).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coe.config import EngineConfig, PoolConfig
from coe.errors import ExpertNotFoundError, InvalidRequestError, NotReadyError, available
from coe.serving.engines.base import Capabilities, Engine, register_engine
from coe.serving.engines.decode_batch import DecodeBatch, causal_lm_forward, row_error
from coe.serving.engines.loading import model_max_len
from coe.serving.engines.rows import Row, StreamBridge
from coe.serving.engines.tokens import stop_ids
from coe.serving.pool.pool import ExpertPool
from coe.serving.pool.scheduler import GroupedQueue
from coe.types import Dispatch

if TYPE_CHECKING:
    from coe.config import CoEConfig
    from coe.serving.engines.spec import EngineSpec


@dataclass(frozen=True)
class PooledModel:
    """What decoding one pool expert needs besides its weights (which the pool leases)."""

    tokenizer: object
    eos: frozenset[int]
    pad_id: int
    max_model_len: int


@register_engine("pool")
class PoolEngine(Engine):
    """Many whole-model experts on one device: host copies, M device slots, grouped batches.

    ``experts``: expert id → model reference. ``pool``: residency and scheduling
    (:class:`~coe.config.PoolConfig`); ``config``: device, dtype, ``max_num_seqs`` (the batch
    size of one session) and ``max_model_len``. ``stream`` raises ExpertNotFoundError when
    ``dispatch.expert`` is missing or unknown; the other contracts are :class:`Engine`'s.
    ``sessions`` keeps the last :attr:`SESSION_LOG` sessions as ``(expert, rows served)``;
    ``sessions_served`` counts them all.
    """

    capabilities = Capabilities(batching="grouped", multi_model=True)
    SESSION_LOG = 256

    def __init__(self, experts: dict[str, str], pool: PoolConfig | None = None,
                 config: EngineConfig | None = None) -> None:
        if not experts:
            raise InvalidRequestError("the pool engine needs at least one expert")
        super().__init__(next(iter(experts.values())), config or EngineConfig(kind="hf"))
        self.experts = dict(experts)
        self.pool_config = pool or PoolConfig()
        self.pool: ExpertPool | None = None
        self._models: dict[str, PooledModel] = {}
        self._queue = GroupedQueue(self.pool_config.policy, self.pool_config.overdue_after_ms, self.config.max_num_seqs)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch: DecodeBatch | None = None  # the running session's batch
        self.sessions: collections.deque[tuple[str, int]] = collections.deque(maxlen=self.SESSION_LOG)
        self.sessions_served = 0

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> PoolEngine:
        """The pool of ``spec.models`` with ``spec.pool`` (ConfigError when either is missing)."""
        from coe.errors import ConfigError

        if not spec.models or spec.pool is None:
            raise ConfigError("the pool engine needs `models` and `pool` in its spec (serving.pool and pooled experts)")
        return cls(spec.models, spec.pool, spec.config)

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
        from coe.model_paths import resolve

        pool = ExpertPool({e: str(resolve(ref)) for e, ref in self.experts.items()}, self.pool_config, self.config)
        pool.load()
        models = {}
        for e in pool.experts():
            host = pool.host_expert(e)
            eos, pad_id = stop_ids(list(host.eos_ids), host.tokenizer)
            models[e] = PooledModel(host.tokenizer, frozenset(eos), pad_id,
                                    model_max_len(host.path, self.config.max_model_len))
        self._models, self.pool = models, pool

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
            row.fail(NotReadyError("the engine was stopped"))
        self.pool, self._models = None, {}

    async def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def running(self) -> int:
        """Requests decoding in the current session or queued (for tests and metrics)."""
        with self._cond:
            return len(self._queue) + (len(self._batch) if self._batch is not None else 0)

    def stats(self) -> dict:
        """A snapshot for metrics and routing: residency (LRU first), swap counters, swap-in cost per
        expert (:meth:`ExpertPool.swap_in_s`), queue, sessions served."""
        pool = self.pool
        if pool is None:
            return {"started": False}
        st = pool.stats
        return {
            "started": True,
            "device": pool.device,
            "swapping": pool.swapping,
            "resident": pool.resident_experts(),
            "max_resident": pool.config.max_resident,
            "slot_bytes": pool.slot_bytes(),
            "hits": st.hits,
            "swaps": st.swaps,
            "prefetches": st.prefetches,
            "evictions": st.evictions,
            "bytes_swapped": st.bytes_swapped,
            # what a swap-in would cost now, per expert (0 when resident; None: nothing measured yet)
            "swap_in_s": {e: pool.swap_in_s(e) for e in pool.experts()},
            "queued": self.queued(),
            "sessions": self.sessions_served,
        }

    def queued(self) -> dict[str, int]:
        """Requests waiting per expert (for metrics and tests)."""
        with self._cond:
            return self._queue.groups()

    # ------------------------------------------------------------------ requests

    def _model_of(self, dispatch: Dispatch) -> PooledModel:
        if self.pool is None:
            raise NotReadyError("the pool engine is not started")
        if dispatch.expert is None or dispatch.expert not in self._models:
            raise ExpertNotFoundError(
                f"request {dispatch.request_id!r} names expert {dispatch.expert!r}; this pool serves: "
                f"{available(self._models)}",
                param="expert",
            )
        return self._models[dispatch.expert]

    def tokenizer_of(self, dispatch: Dispatch):
        return self._model_of(dispatch).tokenizer

    def context_length(self, dispatch: Dispatch) -> int:
        return self._model_of(dispatch).max_model_len

    async def stream(self, dispatch: Dispatch):
        """Yield StreamDeltas once the request's expert is scheduled; errors come before the first."""
        model = self._model_of(dispatch)
        if self._thread is None:
            raise NotReadyError("the pool engine is not started")
        prompt_ids = self.prompt_ids(dispatch)
        params = dispatch.sampling
        bridge = StreamBridge()
        row = Row.create(model.tokenizer, prompt_ids, params, device=self.pool.device, sink=bridge.emit)
        with self._cond:
            self._queue.put(dispatch.expert, row)
            self._cond.notify()
        try:
            async for delta in bridge.deltas():
                yield delta
        finally:
            row.cancelled = True  # queued: dropped when taken; running: dropped at the next step

    # ------------------------------------------------------------------ worker thread

    def _next(self) -> tuple[str, list[Row]] | None:
        """Block until a group is ready; None when stopping. Cancelled rows are skipped."""
        with self._cond:
            while True:
                self._queue.remove_if(lambda r: r.cancelled)
                if self._stopping:
                    return None
                if len(self._queue):
                    return self._queue.next_batch(time.monotonic(), self.pool.resident_experts())
                self._cond.wait()

    def _more(self, expert: str, room: int) -> list[Row]:
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
                failed = self._batch.rows if self._batch is not None else []
                for row in dict.fromkeys(failed + rows):
                    row.fail(row_error(err))
            finally:
                with self._cond:
                    self._batch = None

    def _session(self, expert: str, rows: list[Row]) -> None:
        import torch

        info = self._models[expert]
        served = len(rows)
        with self.pool.lease(expert) as model, torch.inference_mode():
            batch = DecodeBatch(causal_lm_forward(model, self.pool.device), eos=set(info.eos),
                                pad_id=info.pad_id, device=self.pool.device)
            with self._cond:
                self._batch = batch
            self._prefetch_next(expert)
            batch.admit(rows)
            batch.drop_finished()
            while batch.rows and not self._stopping:
                more = self._more(expert, self.config.max_num_seqs - len(batch))
                if more:
                    served += len(more)
                    batch.admit(more)
                else:
                    batch.step()
                batch.drop_finished()
        if self._stopping:
            batch.fail(NotReadyError("the engine was stopped"))
        self.sessions.append((expert, served))
        self.sessions_served += 1
