"""The engine protocol: construction, a handful of async methods, declared capabilities.

An engine serves one base model (or, for the expert pool, several) and any number of LoRA
adapters on it. It is built one way, ``Engine.from_spec(EngineSpec)``, and declares what it
can do in ``capabilities`` instead of being probed. The coroutines are meant to run on one
asyncio loop (the expert server's); they are not thread-safe.

Engines register themselves in their own module with ``@register_engine("name")``; the
registry refuses duplicates. :func:`get_engine_class` discovers the built-in engines by
importing every module of :data:`ENGINE_PACKAGES` (this module imports no engine).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from coe.config import EngineConfig
from coe.errors import ConfigError
from coe.plugins import Registry
from coe.types import GenerationOutput, GenerationRequest, StreamDelta

if TYPE_CHECKING:
    from pathlib import Path

    from coe.serving.engines.spec import EngineSpec

ENGINE_PACKAGES = ("coe.serving.engines", "coe.serving.pool")
_ENGINES: Registry[type[Engine]] = Registry("engine", packages=ENGINE_PACKAGES, error=ConfigError)


@dataclass(frozen=True)
class Capabilities:
    """What an engine declares about itself (read by the expert server).

    ``batching``: how requests should reach it.

    - ``"continuous"``: straight to the engine, which batches in-flight requests at every
      decode step (transformers, vLLM): a window before dispatch only adds latency.
    - ``"grouped"``: straight to the engine, which groups requests by expert itself because a
      swap is paid per group (the expert pool).
    - ``"window"``: the engine runs one batch at a time (the mixture), so the server collects
      requests for a short window and hands each group to ``generate_batch``.

    ``runtime_adapters``: LoRA adapters can be added and removed while serving.
    ``multi_model``: one engine hosts several whole models, chosen by ``request.expert``.
    """

    batching: Literal["continuous", "grouped", "window"] = "continuous"
    runtime_adapters: bool = False
    multi_model: bool = False


def register_engine(name: str) -> Callable[[type[Engine]], type[Engine]]:
    """Class decorator: make an engine available under ``name`` (refuses a second class)."""
    return _ENGINES.register(name)


def engine_names() -> list[str]:
    """Every registered engine name (the built-in ones included), sorted."""
    return _ENGINES.names()


def get_engine_class(name: str) -> type[Engine]:
    """The engine class registered under ``name``; raises ConfigError naming the known ones."""
    return _ENGINES.get(name)


class Engine(abc.ABC):
    """One model, its LoRA adapters, generation.

    Lifecycle: ``Engine.from_spec(spec)``, ``await start()`` once, then ``generate``/``stream``
    concurrently, then ``await stop()``. ``stream`` yields :class:`StreamDelta` s; the last one
    carries the finish reason and usage. Closing the stream early (the caller went away)
    cancels the generation and frees its slot.
    """

    name: ClassVar[str] = "engine"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None) -> None:
        self.model_path = str(model_path)
        self.config = config or EngineConfig()

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> Engine:
        """Build the engine from its spec (default: ``cls(spec.model, spec.config)``).

        Raises ConfigError when the spec lacks what this engine needs."""
        return cls(spec.model, spec.config)

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model. Raises ModelNotFoundError / EngineError."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[StreamDelta]:
        """Generate, yielding text deltas as they are decoded."""

    async def generate(self, request: GenerationRequest) -> GenerationOutput:
        """Generate the whole answer, logprobs included when asked for (default: drain :meth:`stream`)."""
        return GenerationOutput.from_deltas([delta async for delta in self.stream(request)])

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationOutput | Exception]:
        """Generate several requests as one batch: one entry per request, in order.

        A request that fails gets its exception in its place; the others are unaffected
        (default: concurrent :meth:`generate`)."""
        import asyncio

        return list(await asyncio.gather(*(self.generate(r) for r in requests), return_exceptions=True))

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

    def running(self) -> int | None:
        """Requests admitted or waiting, for metrics (None: the engine does not count them)."""
        return None

    def stats(self) -> dict:
        """A snapshot of the engine's own state for metrics and routing (the pool: residency and
        swap-in costs); plain, picklable values. Default: nothing."""
        return {}

    async def stop(self) -> None:
        """Free the model (default: nothing)."""

    async def healthy(self) -> bool:
        return True
