"""The engine protocol: a handful of async methods every backend implements.

An engine serves one base model and any number of LoRA adapters on it. All methods are
coroutines meant to run on one asyncio loop (the expert server's); they are not thread-safe.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from coe.config import EngineConfig
from coe.types import GenerationOutput, GenerationRequest, StreamDelta

_ENGINES: dict[str, type[Engine]] = {}


def register_engine(name: str) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: make an engine available under ``name`` (the config's ``engine.kind``)."""

    def deco(cls: type[Engine]) -> type[Engine]:
        if name in _ENGINES and _ENGINES[name] is not cls:
            raise ValueError(f"engine {name!r} is already registered by {_ENGINES[name].__name__}")
        _ENGINES[name] = cls
        cls.name = name
        return cls

    return deco


def get_engine_class(name: str) -> type[Engine]:
    """The engine class registered under ``name`` (imports the built-in backends lazily)."""
    from coe.serving.engines import hf, mixture, vllm_engine  # noqa: F401  (self-registering)
    from coe.serving.pool import engine as _pool  # noqa: F401

    if name not in _ENGINES:
        from coe.errors import ConfigError, available

        raise ConfigError(f"unknown engine {name!r}; available: {available(_ENGINES)}")
    return _ENGINES[name]


class Engine(abc.ABC):
    """One model, its LoRA adapters, generation.

    Lifecycle: ``await start()`` once, then ``generate``/``stream`` concurrently, then
    ``await stop()``. ``stream`` yields :class:`StreamDelta` s; the last one carries the
    finish reason and usage. Closing the stream early (the caller went away) cancels the
    generation and frees its slot.
    """

    name: str = "engine"

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None) -> None:
        self.model_path = str(model_path)
        self.config = config or EngineConfig()

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model. Raises ModelNotFoundError / EngineError."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Generate, yielding text deltas as they are decoded."""

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Generate the whole answer (default: drain :meth:`stream`)."""
        text, ids, last = [], [], None
        async for delta in self.stream(request):
            text.append(delta.text)
            ids.extend(delta.token_ids)
            last = delta
        assert last is not None
        return GenerationOutput(
            text="".join(text),
            finish_reason=last.finish_reason or "stop",
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            token_ids=ids,
        )

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Generate several requests as one batch (default: concurrent :meth:`generate`)."""
        import asyncio

        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def add_adapter(self, name: str, path: str | Path) -> None:
        """Make a PEFT LoRA adapter available as ``request.adapter == name``.

        Raises AdapterError (unreadable, not a LoRA, rank above ``max_lora_rank``)."""
        from coe.errors import AdapterError

        raise AdapterError(f"engine {self.name!r} does not support LoRA adapters")

    async def remove_adapter(self, name: str) -> None:
        """Forget an adapter; unknown names are ignored."""

    def adapters(self) -> list[str]:
        return []

    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens the request's prompt takes after the chat template (used for context checks)."""
        return len(self.encode_prompt(request))

    @abc.abstractmethod
    def encode_prompt(self, request: GenerationRequest) -> list[int]:
        """Token ids of the prompt after the chat template."""

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    async def stop(self) -> None:
        """Free the model (default: nothing)."""

    async def healthy(self) -> bool:
        return True
