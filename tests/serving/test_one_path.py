"""One call below the HTTP edge (issue #24): no layer under the API has a whole-answer twin of
``stream``, and a request is one Dispatch, tokenized once, carried unchanged to the engine."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from tests.serving.serving_helpers import Harness, tiny_config_dict

ROOT = Path(__file__).resolve().parents[2]
BELOW_THE_EDGE = ["serving/deployments", "serving/engines", "serving/pool", "serving/api/backend.py"]
WHOLE_ANSWER = {"generate", "generate_batch"}


def twins(source: str) -> set[str]:
    """The whole-answer methods of ``source`` when it also defines a ``stream`` (empty: one path)."""
    defined = {n.name for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return defined & WHOLE_ANSWER if "stream" in defined else set()


def modules_below_the_edge() -> list[Path]:
    out = []
    for name in BELOW_THE_EDGE:
        path = ROOT / name
        out += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return out


def test_no_module_below_the_edge_has_a_whole_answer_twin_of_stream():
    assert twins("class E:\n    async def generate(self, d): ...\n    def stream(self, d): ...\n") == {"generate"}
    assert twins("class E:\n    def stream(self, d): ...\n") == set()
    modules = modules_below_the_edge()
    assert len(modules) > 10 and any(p.name == "expert_server.py" for p in modules)
    found = {str(p.relative_to(ROOT)): twins(p.read_text()) for p in modules}
    assert {path: names for path, names in found.items() if names} == {}


@pytest.fixture(scope="module")
def h(loop_thread, tiny_llama_dir, tiny_loras, serving_root, tmp_path_factory):
    from coe.config import parse_config

    root = tmp_path_factory.mktemp("one-path")
    (root / "adapters").symlink_to(serving_root / "adapters")
    harness = Harness(loop_thread, parse_config(tiny_config_dict(tiny_llama_dir, tiny_loras, root, flaky=False)), root)
    yield harness
    harness.close()


def test_a_request_is_one_dispatch_tokenized_once(h, monkeypatch):
    from coe.serving.engines import tokens
    from coe.types import Dispatch

    encoded, seen = [], []
    real_encode = tokens.encode_request

    def encode(tokenizer, request):
        encoded.append(request.request_id)
        return real_encode(tokenizer, request)

    engine = h.backend.servers["expert-tiny"].engine
    real_stream = engine.stream

    def stream(dispatch):
        seen.append(dispatch)
        return real_stream(dispatch)

    monkeypatch.setattr(tokens, "encode_request", encode)
    monkeypatch.setattr(engine, "stream", stream)
    for streamed in (False, True):
        encoded.clear()
        r = h.chat("tiny-a what is 1 + 1 ?", stream=streamed)
        assert r.status_code == 200, r.text
        assert len(encoded) == 1  # the template, the vocabulary and the context: once, in the expert server
    plain, streamed = seen
    for d in seen:
        assert isinstance(d, Dispatch) and d.expert == d.adapter == "tiny-a" and d.server_id == "expert-tiny"
        assert d.prompt_token_ids is not None and d.deadline is not None
        assert d.fallbacks and "tiny-a" not in d.fallbacks  # the decision's next experts travel with it
    assert plain.prompt_token_ids == streamed.prompt_token_ids and plain.request_id != streamed.request_id
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.expert = "tiny"
