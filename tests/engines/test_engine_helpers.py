"""Shared engine helpers: incremental text + stop strings, adapter validation, context check."""

from __future__ import annotations

import json

import pytest

from coe.errors import AdapterError, ContextLengthError
from coe.serving.engines.adapter_check import validate_lora_adapter
from coe.serving.engines.text import TextStream
from coe.serving.engines.tokens import check_context, encode_request
from coe.serving.engines.vllm_engine import vllm_lora_rank

TEXT = "Café naïve — 日本語のテキスト 🙂 done."


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _stream(tok, text, stop=()):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ts, parts, stopped = TextStream(tok, [], list(stop)), [], False
    for i in ids:
        delta, stopped = ts.push(i)
        parts.append(delta)
        if stopped:
            break
    if not stopped:
        parts.append(ts.flush())
    return parts, stopped


def test_incremental_detokenisation_keeps_multibyte_characters(smol_tok):
    parts, stopped = _stream(smol_tok, TEXT)
    assert "".join(parts) == TEXT and not stopped
    assert all("\ufffd" not in p for p in parts)
    assert len([p for p in parts if p]) > 5  # it really streamed


def test_stop_string_across_tokens_is_cut_and_never_leaked(smol_tok):
    parts, stopped = _stream(smol_tok, TEXT, stop=["テキスト"])
    assert stopped and "".join(parts) == "Café naïve — 日本語の"
    assert not any("テ" in p for p in parts)


def test_possible_stop_prefix_is_held_back_then_released(smol_tok):
    parts, stopped = _stream(smol_tok, "one two three", stop=["two four"])
    assert not stopped and "".join(parts) == "one two three"


def test_chat_template_and_bos_handling(smol_tok):
    from coe.types import ChatMessage, GenerationRequest

    req = GenerationRequest(request_id="x", messages=[ChatMessage(role="user", content="Hi")])
    text = smol_tok.decode(encode_request(smol_tok, req))
    assert text.startswith("<|im_start|>") and text.rstrip().endswith("<|im_start|>assistant")


def test_context_check():
    check_context(1000, 24, 1024)
    with pytest.raises(ContextLengthError, match="context is 1024 tokens; the prompt has 1001 tokens"):
        check_context(1001, 24, 1024)


def _adapter(tmp_path, cfg, weights=True):
    folder = tmp_path / "ad"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.mark.parametrize(
    "cfg, weights, match",
    [
        ("{not json", True, "adapter_config.json is not readable JSON"),
        ({"peft_type": "IA3", "r": 4}, True, "peft_type is 'IA3'; only LORA"),
        ({"peft_type": "LORA", "r": 64}, True, "rank 64 exceeds the engine's max_lora_rank 16"),
        ({"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 32}}, True, "rank 32 exceeds"),
        ({"peft_type": "LORA", "r": "x"}, True, "must be a positive integer"),
        ({"peft_type": "LORA", "r": 8}, False, "has no adapter weights"),
    ],
)
def test_bad_adapter_folders_name_the_problem(tmp_path, cfg, weights, match):
    with pytest.raises(AdapterError, match=match):
        validate_lora_adapter(_adapter(tmp_path, cfg, weights), max_rank=16)


def test_missing_adapter_paths(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        validate_lora_adapter(tmp_path / "nope", 16)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="is a file"):
        validate_lora_adapter(tmp_path / "file", 16)
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        validate_lora_adapter(tmp_path, 16)


def test_real_peft_adapter_validates(tiny_loras):
    info = validate_lora_adapter(tiny_loras[1], max_rank=8)
    assert info.rank == 8 and set(info.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_vllm_rank_rounding():
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 16, 300)] == [1, 8, 8, 16, 16, 320]


def test_messages_the_chat_template_refuses_are_a_client_error(smol_tok):
    import copy

    from coe.errors import InvalidRequestError
    from coe.types import ChatMessage, GenerationRequest

    strict = copy.copy(smol_tok)
    strict.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    req = GenerationRequest("x", messages=[ChatMessage(role="system", content="be brief"),
                                           ChatMessage(role="user", content="Hi")])
    with pytest.raises(InvalidRequestError, match="refused the messages: System role not supported") as err:
        encode_request(strict, req)
    assert err.value.param == "messages" and err.value.status_code == 400
    assert encode_request(strict, GenerationRequest("y", messages=req.messages[1:]))  # the user turn alone is fine
