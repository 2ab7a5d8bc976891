"""Llama shapes the benchmarks build random models of (one table for every benchmark).

Random weights of a realistic shape time the same as trained ones (the GPU machine has no
weights); ``tiny`` is for the dry runs and tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A llama shape; the default is small enough for 16 copies on a 2-core CPU machine."""

    hidden: int = 384
    layers: int = 6
    intermediate: int = 1024
    heads: int = 6
    kv_heads: int = 2
    tie: bool = True
    vocab: int | None = None  # None: the tokenizer's size

    def label(self) -> str:
        return f"llama h{self.hidden} L{self.layers} ffn{self.intermediate} heads{self.heads}/{self.kv_heads}"

    def params(self, vocab: int | None = None) -> int:
        """Parameter count (embeddings counted once when tied)."""
        v = vocab or self.vocab or 0
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        emb = v * self.hidden * (1 if self.tie else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden


PRESETS = {
    "tiny": Shape(hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, vocab=512),
    "small": Shape(),
    # the LoRA benchmarks' CPU default: big enough that the adapters' GEMMs are not noise
    "lora-cpu": Shape(hidden=768, layers=4, intermediate=2048, heads=8, kv_heads=4, tie=False, vocab=8192),
    "smollm2": Shape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152),
    # Qwen2.5-0.5B's shape as a llama (0.49 B parameters, tied embeddings): the GPU check's 0.5B
    "qwen0.5b": Shape(hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2, vocab=151936),
}


def llama_config(shape: Shape, vocab: int, *, bos: int | None = 1, eos: int | None = 2, pad: int | None = 0,
                 dtype: str | None = None):
    """A transformers ``LlamaConfig`` of ``shape`` with ``vocab`` tokens."""
    from transformers import LlamaConfig

    kw = {"dtype": dtype} if dtype else {}
    return LlamaConfig(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=shape.tie, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad, **kw,
    )


def init_device() -> str:
    """Where to initialise random weights: CUDA when present (seconds for 0.5B instead of a minute)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
