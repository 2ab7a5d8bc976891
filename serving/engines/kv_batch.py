"""The KV cache of a running batch: one left-padded cache shared by all rows (hf and pool engines).

Design (continuous batching at step granularity):

- Every active request is one row of a batch. The batch keeps one ``DynamicCache`` whose
  layers hold keys/values of shape ``[B, H, T, D]``, and one attention mask ``[B, T]`` where
  each row's tokens are right-aligned (left padding, mask 0 on the padding). Position ids are
  explicit per row, so padding never shifts a row's positions.
- New requests are prefilled together as their own left-padded batch, then *joined* to the
  running batch: the shorter of the two caches is padded on the left with zeros (masked out)
  and both are concatenated along the batch dimension.
- Finished or cancelled rows are removed with an index-select on the batch dimension, and
  leading columns that are padding in every remaining row are trimmed.

The cache is built without the model config, so every layer is a full ``DynamicLayer``; models
with sliding-window attention (Gemma 3) still get their window from the attention mask, which
depends only on relative distances and so is unaffected by the left padding.
"""

from __future__ import annotations

from dataclasses import dataclass


def left_pad(rows: list[list[int]], pad_id: int):
    """``(input_ids [B, T], attention_mask [B, T], position_ids [B, T])`` for right-aligned rows."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@dataclass
class KVBatch:
    """A batch's shared cache and attention mask (``mask`` is ``[B, T]``, T = cached tokens)."""

    cache: object  # transformers DynamicCache
    mask: object  # torch.LongTensor [B, T]

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def _layers(self):
        return [layer for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    def _pad_left(self, n: int) -> None:
        import torch.nn.functional as F

        if n <= 0:
            return
        for layer in self._layers():
            layer.keys = F.pad(layer.keys, (0, 0, n, 0))  # [B, H, T+n, D]
            layer.values = F.pad(layer.values, (0, 0, n, 0))
        self.mask = F.pad(self.mask, (n, 0))

    def join(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows (both caches must cover every layer)."""
        import torch

        width = max(self.mask.shape[1], other.mask.shape[1])
        self._pad_left(width - self.mask.shape[1])
        other._pad_left(width - other.mask.shape[1])
        mine, theirs = self._layers(), other._layers()
        assert len(mine) == len(theirs), "caches cover different layers"
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([a.keys, b.keys], dim=0)
            a.values = torch.cat([a.values, b.values], dim=0)
        self.mask = torch.cat([self.mask, other.mask], dim=0)

    def keep(self, indices: list[int]) -> None:
        """Keep only the rows at ``indices`` (in that order) and trim all-padding columns."""
        import torch

        if len(indices) != self.size:
            idx = torch.tensor(indices, dtype=torch.long, device=self.mask.device)
            for layer in self._layers():
                layer.keys = layer.keys[idx.to(layer.keys.device)]
                layer.values = layer.values[idx.to(layer.values.device)]
            self.mask = self.mask[idx]
        used = (self.mask.sum(0) > 0).nonzero()
        first = int(used[0]) if len(used) else self.mask.shape[1]
        if first > 0:
            for layer in self._layers():
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]
            self.mask = self.mask[:, first:]

    def grow(self):
        """The mask for a decode step (one new token per row); becomes the batch's mask."""
        import torch

        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        return self.mask
