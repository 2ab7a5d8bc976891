"""The one decode core: continuous batching of :class:`Row` s over one causal LM.

:class:`DecodeBatch` is the running batch of an in-process engine (the transformers engine and
the expert pool): ``admit(rows)`` prefills new rows as their own left-padded batch and joins them
to the running one, ``step()`` decodes one token for every row, ``drop_finished()`` removes the
finished and cancelled rows (see :mod:`coe.serving.engines.kv_batch` for the cache layout).
Sampling is :func:`coe.adapters.decode.sample`, per row with the row's own generator.

Row isolation: an error that belongs to one row (its sampling, its detokenisation, its prefill)
ends only that row; the other rows keep decoding. Only a failing decode step, which all rows
share, fails the whole batch (:meth:`DecodeBatch.fail`).

Not thread-safe: one thread drives a batch (the engine's worker).
"""

from __future__ import annotations

from collections.abc import Callable

from coe.errors import CoEError, EngineError
from coe.serving.engines.kv_batch import KVBatch, left_pad
from coe.serving.engines.rows import Row

# forward(input_ids [B, T], mask [B, S], positions [B, T], cache, adapters [B], all_logits=False)
#   -> logits [B, V] of the last position, or [B, T, V] of every position with all_logits=True
Forward = Callable[..., object]


def causal_lm_forward(model, device: str) -> Forward:
    """The plain :data:`Forward` of a transformers causal LM on ``device`` (no adapters)."""

    def forward(input_ids, mask, positions, cache, adapters, all_logits: bool = False):
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,  # 0: every position
        )
        return out.logits if all_logits else out.logits[:, -1, :]

    return forward


def row_error(err: Exception) -> CoEError:
    """What a row's caller sees for ``err``: a CoEError as it is, anything else as EngineError."""
    if isinstance(err, CoEError):
        return err
    return EngineError(f"generation failed: {type(err).__name__}: {str(err)[:300]}")


def sample_rows(rows: list[Row], logits, eos: set[int]) -> None:
    """Sample each unfinished row's next token from its ``logits`` row (``[B, V]``) and accept it,
    with the token's logprobs (from the raw logits) when the row asks for them. A row's
    ``constraint`` masks its logits before sampling.

    An error while sampling or detokenising one row fails that row only."""
    from coe.adapters.decode import sample

    for row, row_logits in zip(rows, logits):
        if row.finished:
            continue
        try:
            allowed = row.constraint.mask(row_logits) if row.constraint is not None else row_logits
            token = int(sample(allowed, row.params.temperature, row.params.top_p, row.generator))
            row.accept(token, eos, row.score(row_logits, token))
        except Exception as err:  # noqa: BLE001  (this row's problem only)
            row.fail(row_error(err))


class DecodeBatch:
    """Rows decoding together in one KV cache (``rows`` in cache order).

    ``forward`` is the model call (:data:`Forward`; the engine decides how adapters apply),
    ``eos`` the ids that end a row, ``pad_id`` the padding id, ``device`` where the cache lives.
    """

    def __init__(self, forward: Forward, *, eos: set[int], pad_id: int, device: str) -> None:
        self.forward = forward
        self.eos, self.pad_id, self.device = eos, pad_id, device
        self.rows: list[Row] = []
        self.kv: KVBatch | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, new: list[Row]) -> None:
        """Prefill ``new`` and join them to the batch; each gets its first token.

        Rows asking for prompt logprobs are prefilled one at a time, keeping every position's
        logits (``[T, V]``: too large to keep for a whole batch); the others together, keeping the
        last. When a joint prefill fails, each row is prefilled alone, so a row that cannot be
        prefilled fails by itself (its sink gets the error) and the others are admitted."""
        new = [r for r in new if not r.finished]
        plain = [r for r in new if r.params.prompt_logprobs is None]
        for group in ([plain] if plain else []) + [[r] for r in new if r.params.prompt_logprobs is not None]:
            self._admit_group(group)

    def _admit_group(self, new: list[Row]) -> None:
        try:
            self._prefill(new)
        except Exception as err:  # noqa: BLE001  (find the row at fault)
            if len(new) == 1:
                new[0].fail(row_error(err))
                return
            for row in new:
                try:
                    self._prefill([row])
                except Exception as one:  # noqa: BLE001
                    row.fail(row_error(one))

    def _prefill(self, new: list[Row]) -> None:
        from transformers import DynamicCache

        ids, mask, positions = left_pad([r.prompt_ids for r in new], self.pad_id)
        cache = DynamicCache()  # no config: full layers only (see kv_batch)
        scored = any(r.params.prompt_logprobs is not None for r in new)
        logits = self.forward(ids, mask, positions, cache, [r.adapter for r in new], all_logits=scored)
        if scored:  # [n, T, V]: each row's prompt positions are its last len(prompt) ones
            for i, row in enumerate(new):
                row.score_prompt(logits[i, logits.shape[1] - len(row.prompt_ids):])
            logits = logits[:, -1, :]  # [n, V]
        part = KVBatch(cache, mask.to(self.device))
        if self.kv is None:
            self.kv = part
        else:
            self.kv.join(part)
        self.rows.extend(new)
        sample_rows(new, logits, self.eos)

    def step(self) -> None:
        """Decode one token for every row (raises when the shared forward fails)."""
        import torch

        if not self.rows:
            return
        tokens = torch.tensor([[r.generated[-1]] for r in self.rows], dtype=torch.long)  # [B, 1]
        positions = torch.tensor([[len(r.prompt_ids) + len(r.generated) - 1] for r in self.rows])  # [B, 1]
        mask = self.kv.grow()  # [B, T+1]
        logits = self.forward(tokens, mask, positions, self.kv.cache, [r.adapter for r in self.rows])
        sample_rows(self.rows, logits, self.eos)

    def drop_finished(self) -> None:
        """Remove finished and cancelled rows from the batch and the cache."""
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.kv = None
        else:
            self.kv.keep(keep)

    def fail(self, err: BaseException, extra: list[Row] = ()) -> None:
        """Give ``err`` to every unfinished row (and to ``extra`` rows not yet admitted); empty the batch."""
        for row in dict.fromkeys(list(self.rows) + list(extra)):
            row.fail(err)
        self.rows, self.kv = [], None
