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
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from coe.config import EngineConfig
from coe.errors import ConfigError, NotReadyError
from coe.plugins import Plugins
from coe.types import Dispatch, StreamDelta

if TYPE_CHECKING:
    from pathlib import Path

    from coe.serving.engines.spec import EngineSpec

ENGINE_PACKAGES = ("coe.serving.engines", "coe.serving.pool")
_ENGINES: Plugins[type[Engine]] = Plugins("engine", packages=ENGINE_PACKAGES, error=ConfigError)


@dataclass(frozen=True)
class Capabilities:
    """What an engine declares about itself (read by the expert server).

    ``batching``: how the engine batches the streams it is given (each reaches it at once).

    - ``"continuous"``: in-flight requests join the batch at every decode step (transformers, vLLM).
    - ``"grouped"``: requests are grouped by expert, because a swap is paid per group (the pool).
    - ``"window"``: one batch runs at a time (the mixture), so the engine collects requests for
      a short window (:mod:`coe.serving.engines.window`) and decodes each window as one batch.

    ``runtime_adapters``: LoRA adapters can be added and removed while serving.
    ``multi_model``: one engine hosts several whole models, chosen by ``dispatch.expert``.
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

    Lifecycle: ``Engine.from_spec(spec)``, ``await start()`` once, then ``stream`` concurrently,
    then ``await stop()``. There is one call per generation, ``stream(dispatch)``: it yields
    :class:`StreamDelta` s, the last one carrying the finish reason, the usage and (when asked
    for) the logprobs; a whole answer is the caller's to join (``GenerationOutput.from_deltas``).
    Closing the stream early (the caller went away) cancels the generation and frees its slot.
    """

    name: ClassVar[str] = "engine"
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, model_path: str | Path, config: EngineConfig | None = None) -> None:
        self.model_path = str(model_path)
        self.config = config or EngineConfig()
        self._tokenizer = None  # the model's, set by start()

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> Engine:
        """Build the engine from its spec (default: ``cls(spec.model, spec.config)``).

        Raises ConfigError when the spec lacks what this engine needs."""
        return cls(spec.model, spec.config)

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model. Raises ModelNotFoundError / EngineError."""

    @abc.abstractmethod
    def stream(self, dispatch: Dispatch) -> AsyncIterator[StreamDelta]:
        """Generate ``dispatch``, yielding deltas as they are decoded; errors in the request
        (context, adapter, content) raise before the first delta. Decodes
        ``dispatch.prompt_token_ids`` (see :meth:`prompt_ids`)."""

    def tokenizer_of(self, dispatch: Dispatch):
        """The tokenizer of the dispatch's model (NotReadyError before :meth:`start`)."""
        if self._tokenizer is None:
            raise NotReadyError(f"engine {self.name!r} for {self.model_path} is not started")
        return self._tokenizer

    def encode_prompt(self, dispatch: Dispatch) -> list[int]:
        """Token ids of the prompt after the chat template (InvalidRequestError for a bad one)."""
        from coe.serving.engines.tokens import encode_request

        return encode_request(self.tokenizer_of(dispatch), dispatch.request)

    def context_length(self, dispatch: Dispatch) -> int:
        """The context the dispatch's model has (default: :attr:`max_model_len`)."""
        return self.max_model_len

    def prepare(self, dispatch: Dispatch) -> Dispatch:
        """``dispatch`` with ``prompt_token_ids`` set: the one place a prompt is tokenized and its
        context checked (ContextLengthError, InvalidRequestError). The expert server calls it
        once per request, before the engine's queue."""
        from coe.serving.engines.tokens import check_context

        ids = self.encode_prompt(dispatch)
        check_context(len(ids), dispatch.sampling.max_tokens, self.context_length(dispatch))
        return dataclasses.replace(dispatch, prompt_token_ids=tuple(ids))

    def prompt_ids(self, dispatch: Dispatch) -> list[int]:
        """The prompt ``stream`` decodes: the ids :meth:`prepare` set; a dispatch not prepared (a
        caller of the engine alone: a script, a test) is prepared now."""
        if dispatch.prompt_token_ids is None:
            dispatch = self.prepare(dispatch)
        return list(dispatch.prompt_token_ids)

    async def add_adapter(self, name: str, path: str | Path) -> None:
        """Make a PEFT LoRA adapter available as ``dispatch.adapter == name``.

        Raises AdapterError (unreadable, not a LoRA, rank above ``max_lora_rank``)."""
        from coe.errors import AdapterError

        raise AdapterError(f"engine {self.name!r} does not support LoRA adapters")

    async def remove_adapter(self, name: str) -> None:
        """Forget an adapter; unknown names are ignored."""

    def adapters(self) -> list[str]:
        return []

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
