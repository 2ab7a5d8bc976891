"""``coe generate``: one chat answer from a model through either engine (optionally a LoRA)."""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate one answer with the hf or vllm engine")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", default="smollm2-135m-instruct", help="built-in alias, local folder or hub id")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="engine backend (default: hf)")
    p.add_argument("--adapter", default=None, help="folder of a PEFT LoRA adapter to apply")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--usage", action="store_true", help="print token counts to stderr")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.set_defaults(func=_generate)


def _request(args):
    from pydantic import ValidationError

    from coe.config import format_validation_error
    from coe.errors import InvalidRequestError
    from coe.types import ChatMessage, GenerationRequest, SamplingParams

    try:
        sampling = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, stop=args.stop, seed=args.seed
        )
    except ValidationError as err:
        raise InvalidRequestError(format_validation_error(err, "sampling options")) from None
    if args.raw:
        return GenerationRequest(request_id="cli", prompt=args.prompt, sampling=sampling)
    messages = [ChatMessage(role="system", content=args.system)] if args.system else []
    messages.append(ChatMessage(role="user", content=args.prompt))
    return GenerationRequest(request_id="cli", messages=messages, sampling=sampling)


def _engine_config(args):
    from pydantic import ValidationError

    from coe.config import EngineConfig, format_validation_error
    from coe.errors import ConfigError

    try:
        return EngineConfig(
            kind=args.engine,
            device=args.device,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=4,
            max_lora_rank=args.max_lora_rank,
            **({"max_loras": 1} if args.engine == "vllm" else {}),  # a vLLM-only field
        )
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "engine options")) from None


async def _run(args) -> int:
    from coe.serving.engines.base import get_engine_class
    from coe.types import Dispatch, GenerationOutput

    request = Dispatch(_request(args), adapter="cli" if args.adapter else None)
    config = _engine_config(args)
    engine = get_engine_class(args.engine)(args.model, config)
    await engine.start()
    try:
        if args.adapter:
            await engine.add_adapter("cli", args.adapter)
        if args.stream:
            last = None
            async for delta in engine.stream(request):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                last = delta
            sys.stdout.write("\n")
            usage = (last.prompt_tokens, last.completion_tokens, last.finish_reason)
        else:
            out = GenerationOutput.from_deltas([delta async for delta in engine.stream(request)])
            print(out.text)
            usage = (out.prompt_tokens, out.completion_tokens, out.finish_reason)
        if args.usage:
            print(f"prompt_tokens={usage[0]} completion_tokens={usage[1]} finish_reason={usage[2]}", file=sys.stderr)
    finally:
        await engine.stop()
    return 0


def _generate(args) -> int:
    import asyncio
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return asyncio.run(_run(args))
