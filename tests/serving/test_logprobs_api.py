"""Log-probabilities through the HTTP API in-process (tiny llama on the real transformers engine):
chat ``logprobs``/``top_logprobs`` (plain and streamed), vLLM's ``prompt_logprobs`` and chat
rendering flags, the legacy ``/v1/completions`` (echo, token-id prompts, the lm-eval request), and
the 400s naming the field."""

from __future__ import annotations

import json

import pytest
import torch

from tests.serving.serving_helpers import Harness, tiny_config_dict


@pytest.fixture(scope="module")
def h(loop_thread, tiny_llama_dir, tiny_loras, serving_root, tmp_path_factory):
    from coe.config import parse_config

    root = tmp_path_factory.mktemp("logprobs-api")
    (root / "adapters").symlink_to(serving_root / "adapters")
    harness = Harness(loop_thread, parse_config(tiny_config_dict(tiny_llama_dir, tiny_loras, root, flaky=False)), root)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def logp_of(model, ids):
    """Teacher-forced log_softmax ``[T, V]`` of the base model over ``ids``."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def events(resp) -> list[dict]:
    lines = [ln for ln in resp.text.split("\n\n") if ln]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]


def assert_400(resp, field: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == field and field in err["message"], err


QUESTION = "what is the capital of france ?"


# ------------------------------------------------------------------ chat


def test_chat_logprobs_in_openai_shape(h, tiny):
    model, tok = tiny
    r = h.chat(QUESTION, model="tiny", logprobs=True, top_logprobs=3)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    rendered = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                       add_generation_prompt=True)
    prompt = tok(rendered)["input_ids"]
    generated = [tok.convert_tokens_to_ids(tok.tokenize(c["token"]))[0] if c["token"] else None for c in content]
    for i, c in enumerate(content):
        assert set(c) == {"token", "logprob", "bytes", "top_logprobs"}
        assert c["bytes"] == list(c["token"].encode())
        tops = c["top_logprobs"]
        assert len(tops) == 3 and [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == c["token"] and tops[0]["logprob"] == pytest.approx(c["logprob"])  # greedy
        if i == 0:  # the first generated token against the model's own logits
            logp = logp_of(model, prompt)[-1]
            assert c["logprob"] == pytest.approx(float(logp.max()), abs=1e-4)
            assert generated[0] == int(logp.argmax())
    assert r.json().get("prompt_logprobs") is None

    bare = h.chat(QUESTION, model="tiny", logprobs=True)
    assert all(c["top_logprobs"] == [] for c in bare.json()["choices"][0]["logprobs"]["content"])
    off = h.chat(QUESTION, model="tiny")
    assert off.json()["choices"][0]["logprobs"] is None


def test_chat_stream_carries_the_same_logprobs(h):
    plain = h.chat(QUESTION, model="tiny-a", logprobs=True, top_logprobs=2).json()
    r = h.chat(QUESTION, model="tiny-a", logprobs=True, top_logprobs=2, stream=True)
    assert r.status_code == 200
    streamed = [c for e in events(r) for ch in e["choices"] if ch.get("logprobs") for c in ch["logprobs"]["content"]]
    expected = plain["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in streamed] == [c["token"] for c in expected]
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in expected], abs=1e-5)


def test_chat_prompt_logprobs_score_a_final_assistant_message(h, tiny):
    model, tok = tiny
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "paris is the capital"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0,
            "add_generation_prompt": False, "continue_final_message": True}
    r = h.request("POST", "/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    plp = r.json()["prompt_logprobs"]
    rendered = tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    ids = tok(rendered)["input_ids"]
    assert len(plp) == len(ids) and plp[0] is None
    assert [list(map(int, p)) for p in plp[1:]] == [[t] for t in ids[1:]]  # 0: only the prompt token itself
    logp = logp_of(model, ids)
    for pos in range(1, len(ids)):
        entry = plp[pos][str(ids[pos])]
        assert entry["logprob"] == pytest.approx(float(logp[pos - 1, ids[pos]]), abs=1e-4)
        assert entry["rank"] == 1 + int((logp[pos - 1] > logp[pos - 1, ids[pos]]).sum())
        assert entry["decoded_token"] == tok.decode([ids[pos]])
    wider = h.request("POST", "/v1/chat/completions", json={**body, "prompt_logprobs": 2}).json()["prompt_logprobs"]
    assert all(1 <= len(p) <= 3 for p in wider[1:]) and any(len(p) == 3 for p in wider[1:])

    streamed = h.request("POST", "/v1/chat/completions", json={**body, "stream": True})
    firsts = [e for e in events(streamed) if e.get("prompt_logprobs")]
    assert len(firsts) == 1 and firsts[0]["prompt_logprobs"] == plp


@pytest.mark.parametrize("extra, field", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # OpenAI: top_logprobs needs logprobs: true
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"continue_final_message": True}, "continue_final_message"),  # with add_generation_prompt (default true)
    ({"continue_final_message": True, "add_generation_prompt": False}, "continue_final_message"),  # last: user
])
def test_bad_chat_logprob_fields_are_400_naming_the_field(h, extra, field):
    assert_400(h.chat(QUESTION, model="tiny", **extra), field)


# ------------------------------------------------------------------ legacy completions


def complete(h, **body):
    return h.request("POST", "/v1/completions", json={"temperature": 0, "max_tokens": 4, **body})


def test_completion_of_text_routed_with_echo_and_logprobs(h, tiny):
    _, tok = tiny
    prompt = "what is tiny-a 1 + 2 ?"
    r = complete(h, model="coe", prompt=prompt, echo=True, logprobs=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny-a" == body["coe"]["expert"] and r.headers["x-coe-expert"] == "tiny-a"
    choice = body["choices"][0]
    plain = complete(h, model="coe", prompt=prompt).json()["choices"][0]
    assert choice["text"] == prompt + plain["text"] and plain["logprobs"] is None
    lp = choice["logprobs"]
    ids = tok(prompt)["input_ids"]
    n_prompt, usage = len(ids), body["usage"]
    assert usage["prompt_tokens"] == n_prompt
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == n_prompt + usage["completion_tokens"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:n_prompt] == [tok.decode([t]) for t in ids]
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][n_prompt] == len(prompt)
    assert all(1 <= len(t) <= 3 for t in lp["top_logprobs"][1:])
    greedy = lp["top_logprobs"][n_prompt:]
    assert all(max(t.values()) == pytest.approx(v) for t, v in zip(greedy, lp["token_logprobs"][n_prompt:]))


def test_completion_of_token_ids_pinned(h, tiny):
    model, tok = tiny
    ids = tok("the capital of france is")["input_ids"]
    r = complete(h, model="tiny", prompt=ids, logprobs=0)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == r.json()["usage"]["completion_tokens"]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    logp = logp_of(model, ids)[-1]
    assert choice["logprobs"]["token_logprobs"][0] == pytest.approx(float(logp.max()), abs=1e-4)
    echoed = complete(h, model="tiny", prompt=[ids], echo=True).json()["choices"][0]
    assert echoed["text"] == "".join(tok.decode([t]) for t in ids) + choice["text"]
    assert echoed["logprobs"] is None


def test_the_lm_eval_loglikelihood_request(h, tiny):
    """lm-evaluation-harness local-completions: token ids of context + continuation, echo, logprobs 1,
    max_tokens 1; it sums token_logprobs[ctxlen:-1] and checks greedy with max(top_logprobs)."""
    model, tok = tiny
    context, continuation = tok("the capital of france is")["input_ids"], tok(" paris", add_special_tokens=False)["input_ids"]
    ids = context + continuation
    r = h.request("POST", "/v1/completions", json={"model": "tiny", "prompt": [ids], "temperature": 0, "max_tokens": 1,
                                                   "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    ctxlen = len(context)
    token_lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    logp = logp_of(model, ids)
    expected = [float(logp[p - 1, ids[p]]) for p in range(ctxlen, len(ids))]
    assert token_lps == pytest.approx(expected, abs=1e-4)
    greedy = all(t == max(top.values()) for t, top in zip(token_lps, tops))
    assert greedy == all(int(logp[p - 1].argmax()) == ids[p] for p in range(ctxlen, len(ids)))


def test_completion_stream_matches_plain(h):
    plain = complete(h, model="tiny", prompt="hello world", echo=True, logprobs=1).json()["choices"][0]
    r = complete(h, model="tiny", prompt="hello world", echo=True, logprobs=1, stream=True,
                 stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert all(c["object"] == "text_completion" for c in chunks) and chunks[0]["coe"]["expert"] == "tiny"
    choices = [ch for c in chunks for ch in c["choices"]]
    assert "".join(ch["text"] for ch in choices) == plain["text"]
    tokens = [t for ch in choices if ch.get("logprobs") for t in ch["logprobs"]["tokens"]]
    offsets = [t for ch in choices if ch.get("logprobs") for t in ch["logprobs"]["text_offset"]]
    assert tokens == plain["logprobs"]["tokens"] and offsets == plain["logprobs"]["text_offset"]
    assert choices[-1]["finish_reason"] and chunks[-1]["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("body, field", [
    ({"prompt": ["hello", "world"]}, "prompt"),
    ({"prompt": [[4, 5], [6]], "model": "tiny"}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [4, 5, 99999], "model": "tiny"}, "prompt"),
    ({"prompt": [4, 5]}, "model"),  # token ids need a pinned expert
    ({"prompt": "hello", "best_of": 2}, "best_of"),
    ({"prompt": "hello", "suffix": "world"}, "suffix"),
    ({"prompt": "hello", "logprobs": 21}, "logprobs"),
    ({"prompt": "hello", "n": 2}, "n"),
    ({"prompt": "hello", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hello", "presence_penalty": 1}, "presence_penalty"),
])
def test_bad_completion_fields_are_400_naming_the_field(h, body, field):
    assert_400(complete(h, **body), field)


def test_completions_is_declared_in_openapi(h):
    spec = h.request("GET", "/openapi.json").json()
    op = spec["paths"]["/v1/completions"]["post"]
    assert {"400", "401", "429", "503"} <= set(op["responses"])
    assert "echo" in spec["components"]["schemas"]["CompletionRequest"]["properties"]
