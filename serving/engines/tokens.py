"""Tokens: the tokenizer, prompt encoding through the chat template, the context check, stop ids.

Every engine turns a :class:`GenerationRequest` into prompt token ids with the same code here
(``encode_request``), so the transformers and vLLM engines see identical prompt tokens.
"""

from __future__ import annotations

from coe.errors import ContextLengthError, InvalidRequestError
from coe.serving.engines.loading import model_load_error
from coe.types import GenerationRequest


def load_tokenizer(model_ref: str):
    """The model's tokenizer (a hub id that cannot be reached raises ModelNotFoundError)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_ref)
    except (OSError, ValueError) as err:
        raise model_load_error(model_ref, err) from None


def chat_template_of(tokenizer) -> str:
    """The tokenizer's chat template, or the plain Question/Answer one for models without one."""
    from coe.model_paths import PLAIN_CHAT_TEMPLATE

    return getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def encode_request(tokenizer, request: GenerationRequest) -> list[int]:
    """Prompt token ids: ``prompt_token_ids`` as given, chat ``messages`` through the chat
    template (with the request's ``add_generation_prompt`` / ``continue_final_message`` and
    ``tools``; messages as :func:`template_messages` gives them), or the raw ``prompt``.

    Special tokens (BOS) are added the way the tokenizer is configured; a template that already
    writes BOS itself does not get a second one. Raises InvalidRequestError when the request
    has neither messages nor a prompt, when both chat flags are set or the final message to
    continue is not the assistant's, for an assistant's malformed ``tool_calls``, for messages
    the model's chat template refuses (its ``raise_exception``) and for token ids outside the
    vocabulary.
    """
    from jinja2 import TemplateError

    if request.prompt_token_ids is not None:
        return check_token_ids(tokenizer, request.prompt_token_ids)
    if request.messages:
        check_chat_flags(request.messages, request.add_generation_prompt, request.continue_final_message)
        try:
            text = tokenizer.apply_chat_template(
                template_messages(request.messages), chat_template=chat_template_of(tokenizer), tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **({"tools": request.tools} if request.tools else {}),
            )
        except (TemplateError, ValueError, TypeError) as err:  # the request's content, not the engine
            why = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise InvalidRequestError(f"the model's chat template refused the messages: {why}",
                                      param="messages") from None
    elif request.prompt is not None:
        text = request.prompt
    else:
        raise InvalidRequestError("a generation request needs `messages` or a `prompt`")
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if not ids:
        raise InvalidRequestError("the prompt is empty after tokenization")
    return ids


def template_messages(messages) -> list[dict]:
    """Chat messages as chat templates read them: ``role`` and ``content`` (text), plus an
    assistant's OpenAI ``tool_calls`` with each call's ``arguments`` decoded from its JSON string
    into an object (templates write ``arguments | tojson``; vLLM decodes them the same way), and a
    ``tool`` message's ``tool_call_id`` / ``name``. Raises InvalidRequestError naming
    ``messages[i].tool_calls`` for a call without a function name or with arguments that are not a
    JSON object."""
    out = []
    for i, m in enumerate(messages):
        message = {"role": m.role, "content": m.text()}
        extra = m.model_extra or {}
        if m.role == "assistant" and extra.get("tool_calls"):
            message["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{k}]")
                                     for k, call in enumerate(extra["tool_calls"])]
        elif m.role == "tool":
            message.update({key: extra[key] for key in ("tool_call_id", "name") if extra.get(key) is not None})
        out.append(message)
    return out


def _template_call(call, where: str) -> dict:
    import json

    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where} needs function.name (OpenAI's shape: "
                                  "{id, type: 'function', function: {name, arguments}})", param="messages")
    args = function.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            args = None
    if not isinstance(args, dict):
        raise InvalidRequestError(f"{where}.function.arguments must be a JSON object encoded as a string",
                                  param="messages")
    return {"id": call.get("id"), "type": "function", "function": {"name": name, "arguments": args}}


def check_chat_flags(messages, add_generation_prompt: bool, continue_final_message: bool) -> None:
    """InvalidRequestError when ``continue_final_message`` is set with ``add_generation_prompt``
    or without a final assistant message to continue (vLLM's rules)."""
    if not continue_final_message:
        return
    if add_generation_prompt:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true: set add_generation_prompt "
            "to false to continue the final assistant message", param="continue_final_message")
    if not messages or messages[-1].role != "assistant":
        raise InvalidRequestError(
            "continue_final_message needs a final message with role 'assistant' to continue",
            param="continue_final_message")


def check_token_ids(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` when every one is a token of ``tokenizer`` (InvalidRequestError naming ``prompt``
    otherwise, and for an empty list)."""
    size = len(tokenizer)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < size]
    if not ids or bad:
        why = "is empty" if not ids else f"has ids outside the vocabulary (0 to {size - 1}): {bad[:5]}"
        raise InvalidRequestError(f"the prompt's token ids {why}", param="prompt")
    return list(ids)


def check_context(prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Raise ContextLengthError when ``prompt_tokens + max_tokens`` exceeds ``max_model_len``."""
    if prompt_tokens + max_tokens > max_model_len:
        raise ContextLengthError(
            f"this model's context is {max_model_len} tokens; the prompt has {prompt_tokens} tokens and "
            f"max_tokens is {max_tokens} ({prompt_tokens + max_tokens} in all): shorten the prompt or lower max_tokens",
            param="max_tokens",
        )


def stop_ids(generation_eos, tokenizer) -> tuple[set[int], int]:
    """The token ids that end a generation (the model's ``generation_config.eos_token_id``,
    an int, a list or None, plus the tokenizer's EOS) and the padding id (the tokenizer's, else
    the smallest EOS, else 0)."""
    if isinstance(generation_eos, int):
        generation_eos = [generation_eos]
    eos = set(generation_eos or [])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    return eos, pad if pad is not None else min(eos or {0})
