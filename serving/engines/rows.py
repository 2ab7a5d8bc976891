"""One request in flight in an in-process engine, and the bridge that carries its output.

A :class:`Row` is what the decode thread knows about a request: its prompt ids, sampling
parameters, generator, text stream and where its output goes (``sink``). The transformers
engine, the expert pool and the mixture engine all decode :class:`Row` s.

A :class:`StreamBridge` is the one thread-to-asyncio hand-off: the decode thread calls
``emit`` (thread-safe), the caller's asyncio loop iterates :meth:`StreamBridge.deltas`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from coe.errors import CoEError, EngineError
from coe.serving.engines.text import TextStream
from coe.types import PositionLogprobs, SamplingParams, StreamDelta


def make_generator(seed: int | None, device: str):
    """A per-request ``torch.Generator``: seeded requests are reproducible, others draw a fresh
    seed. Raises InvalidRequestError for a seed torch cannot use."""
    import random

    import torch

    from coe.errors import InvalidRequestError

    gen = torch.Generator(device=device)
    try:
        gen.manual_seed(seed if seed is not None else random.getrandbits(63))
    except (RuntimeError, OverflowError, TypeError, ValueError):
        raise InvalidRequestError(
            f"seed {seed!r} is not usable: use an integer from 0 to {2**64 - 1}", param="seed"
        ) from None
    return gen


class StreamBridge:
    """Carries a request's output from a worker thread to the asyncio loop that created it.

    ``emit(item)`` (any thread) queues a :class:`StreamDelta` or an exception and returns False
    when the caller's loop is closed (nobody listens any more). :meth:`deltas` (the creating
    loop) yields the deltas up to and including the one with a finish reason and raises a
    queued exception: a :class:`CoEError` as it is, anything else as :class:`EngineError`.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, item: StreamDelta | BaseException) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            return False
        return True

    async def deltas(self) -> AsyncIterator[StreamDelta]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                if isinstance(item, CoEError):
                    raise item
                raise EngineError(f"generation failed: {type(item).__name__}: {item}") from item
            yield item
            if item.finish_reason is not None:
                return


class TokenConstraint(Protocol):
    """A per-row constraint on the next token (guided decoding, ``response_format``; see
    :mod:`coe.serving.engines.structured`): ``mask`` the row's raw logits before sampling,
    ``accept`` the sampled token; the row ends once ``terminated``."""

    def mask(self, logits): ...

    def accept(self, token: int) -> None: ...

    @property
    def terminated(self) -> bool: ...


@dataclass(eq=False)
class Row:
    """One request being decoded (owned by the decode thread once admitted).

    ``sink`` receives every :class:`StreamDelta` and, on failure, one exception; a sink that
    returns False (its listener is gone) cancels the row. ``cancelled`` may be set from any
    thread; the decode loop drops cancelled rows at its next step. ``constraint`` (None: free)
    masks the row's logits before sampling and ends the row when its grammar ends.
    """

    prompt_ids: list[int]
    params: SamplingParams
    text: TextStream
    generator: object
    sink: Callable[[StreamDelta | BaseException], bool | None]
    adapter: str | None = None
    generated: list[int] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    done: bool = False
    cancelled: bool = False
    constraint: TokenConstraint | None = None

    @classmethod
    def create(cls, tokenizer, prompt_ids: list[int], params: SamplingParams, *, device: str, sink,
               adapter: str | None = None) -> Row:
        """A new row (raises InvalidRequestError for an unusable seed or a ``response_format`` that
        does not compile: only this request fails). A ``response_format`` is compiled here (cached per
        schema and tokenizer), so call this off the event loop when one is set."""
        from coe.serving.engines.structured import constraint_for

        generator = make_generator(params.seed, device)
        return cls(prompt_ids, params, TextStream(tokenizer, prompt_ids, params.stop), generator, sink, adapter,
                   constraint=constraint_for(tokenizer, params.response_format))

    @property
    def finished(self) -> bool:
        return self.done or self.cancelled

    def send(self, item: StreamDelta | BaseException) -> None:
        if self.sink(item) is False:
            self.cancelled = True

    def decode_token(self, token_id: int) -> str:
        """One token's text (a logprob's ``decoded_token``)."""
        return self.text.tokenizer.decode([token_id])

    def score(self, logits, token: int) -> PositionLogprobs | None:
        """The logprobs of the sampled ``token`` under ``logits`` (``[V]``, raw) when the row asks
        for them (``params.logprobs``), else None."""
        n = self.params.logprobs
        if n is None:
            return None
        from coe.logprobs import position_logprobs

        return position_logprobs(logits.unsqueeze(0), [token], n, self.decode_token)[0]

    def score_prompt(self, logits) -> None:
        """Keep the prompt's logprobs from its teacher-forced ``logits`` (``[T, V]``, one row per
        prompt token) when the row asks for them; the first delta carries them."""
        n = self.params.prompt_logprobs
        if n is not None:
            from coe.logprobs import prompt_logprobs

            self.prompt_logprobs = prompt_logprobs(logits, self.prompt_ids, n, self.decode_token)

    def fail(self, err: BaseException) -> None:
        """End the row with ``err`` (given to its sink once; a finished row is left alone)."""
        if not self.done:
            self.done = True
            self.send(err)

    def accept(self, token: int, eos: set[int], logprobs: PositionLogprobs | None = None) -> None:
        """Append a sampled ``token`` (with its ``logprobs`` when asked for) and send the
        resulting :class:`StreamDelta`; the first one carries the prompt's logprobs and ids
        when ``params.prompt_logprobs`` asked for them.

        The row is done after an EOS id, a stop string, the end of its constraint's grammar, or
        ``max_tokens`` tokens. A cancelled row sends nothing."""
        self.generated.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        finish = None
        if token in eos or (self.constraint is not None and self.constraint.terminated):
            text, finish = self.text.flush(), "stop"
        else:
            text, stopped = self.text.push(token)
            if stopped:
                finish = "stop"
            elif len(self.generated) >= self.params.max_tokens:
                text, finish = text + self.text.flush(), "length"
        self.done = finish is not None
        if self.cancelled:
            return
        delta = StreamDelta(text=text, token_ids=[token], finish_reason=finish, prompt_tokens=len(self.prompt_ids),
                            completion_tokens=len(self.generated), logprobs=[logprobs] if logprobs else None)
        if len(self.generated) == 1 and self.params.prompt_logprobs is not None:
            delta.prompt_logprobs, delta.prompt_token_ids = self.prompt_logprobs, list(self.prompt_ids)
            delta.prompt_token_texts = [self.decode_token(t) for t in self.prompt_ids]
        self.send(delta)
