"""Helpers shared by the test packages: one event loop on a thread, tiny LoRA adapters, a tiny byte-level llama."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path


def dispatch_of(request, **aim):
    """``request`` (a GenerationRequest or a Dispatch) as a :class:`~coe.types.Dispatch` aimed by
    ``aim`` (``expert``, ``adapter``, ``adapter_path``)."""
    import dataclasses

    from coe.types import Dispatch

    return dataclasses.replace(request, **aim) if isinstance(request, Dispatch) else Dispatch(request=request, **aim)


async def generate(streamer, request, *args, **aim):
    """The whole answer of ``streamer.stream(dispatch, *args)`` (an engine or an expert server):
    the tests' join of the one streaming call."""
    from coe.types import GenerationOutput

    return GenerationOutput.from_deltas([d async for d in streamer.stream(dispatch_of(request, **aim), *args)])


async def generate_batch(engine, requests) -> list:
    """Each request's whole answer, sent together (an exception in place of a failed one)."""
    return list(await asyncio.gather(*(generate(engine, r) for r in requests), return_exceptions=True))


class LoopThread:
    """An asyncio loop running forever on a daemon thread; ``run`` waits for a coroutine.

    vLLM's ``AsyncLLM`` binds to the loop that first uses it, so every engine call in these
    tests goes through one long-lived loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="engine-tests-loop", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 600):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_lora(base_dir: Path, out: Path, *, rank: int = 4, seed: int = 0, targets=("q_proj", "v_proj")) -> Path:
    """Save a peft LoRA adapter for the model in ``base_dir`` with non-zero random B weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def make_byte_level_llama(folder: Path) -> Path:
    """A 2-layer, width-64 random llama with a ~300-token byte-level BPE tokenizer trained in place
    (no BOS), saved in ``folder``: a tiny model that can spell any text, JSON included (the word-level
    tiny llama cannot)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.conftest import TINY_CHAT_TEMPLATE

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ['{"city": "paris", "ok": true, "n": 12}', "what is the capital of france ?", "[1, 2, 3] null false"] * 20
    special = ["</s>", "<pad>"]  # few: xgrammar sees a byte-level vocabulary when >= 99% of it is byte-level
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder
