"""#23 "No crash", through the service: the request that used to take the whole ``expert-smollm2``
server down (three concurrent chat requests with ``prompt_logprobs: 0`` to ``smollm2-math``,
``smollm2-code`` and ``smollm2``, the base and two LoRAs on one vLLM engine; vllm#16668), sent 20
times. Every answer is a 200 with the prompt's log-probabilities (or a clear 400), and the
service keeps serving throughout.

The service runs in process (ingress logic, admission, the expert server) on the session's real
vLLM engine (SmolLM2, float32) with two rank-8 LoRAs under the default service's expert ids; the
engine-level check of the values against transformers is test_vllm_prompt_logprobs.py. Slow: the
prepared SmolLM2 (skipped otherwise) and vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from tests.helpers import make_lora

pytestmark = pytest.mark.slow

ROUNDS = 20
QUESTION = "What is 12 times 12? Explain it step by step."


@pytest.fixture(scope="module")
def loras(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("no-crash")
    return {"smollm2-math": make_lora(smollm2_dir, root / "math", rank=8, seed=11),
            "smollm2-code": make_lora(smollm2_dir, root / "code", rank=8, seed=12,
                                      targets=("gate_proj", "up_proj", "down_proj"))}


def test_the_mixed_prompt_logprob_batch_twenty_times_keeps_the_service_up(smollm2_vllm, smollm2_dir, loras, loop,
                                                                           tmp_path):
    from coe.config import parse_config
    from coe.serving.engines.vllm_engine import VLLMEngine
    from tests.serving.serving_helpers import Harness

    engine = smollm2_vllm

    class Lent(VLLMEngine):   # the session's running engine: the service's stop leaves it running
        @classmethod
        def from_spec(cls, spec):
            return _Lent(engine)

    cfg = {"kind": "vllm", "dtype": "float32", "max_model_len": 1024, "max_lora_rank": 8, "max_loras": 2}
    config = parse_config({
        "router": {"name": "centroid", "default_expert": "smollm2"},
        "experts": [{"id": "smollm2", "kind": "model", "model": str(smollm2_dir), "engine": cfg,
                     "description": "general questions"},
                    *({"id": eid, "kind": "lora", "base": "smollm2", "adapter": str(path), "description": eid}
                      for eid, path in loras.items())],
        "serving": {"registry_path": str(tmp_path / "registry.sqlite"), "max_tokens_limit": 64},
    })
    h = Harness(loop, config, tmp_path, engine_cls_for=lambda spec: Lent, default="smollm2")
    experts = ["smollm2-math", "smollm2-code", "smollm2"]

    async def batch():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://coe",
                                     timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json={
                "model": eid, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4,
                "temperature": 0, "prompt_logprobs": 0}) for eid in experts))

    try:
        firsts: dict[str, list[float]] = {}
        for n in range(ROUNDS):
            for eid, r in zip(experts, loop.run(batch())):
                assert r.status_code in (200, 400), (n, eid, r.status_code, r.text)
                if r.status_code == 400:   # a refusal must say what to change, never be an engine failure
                    assert "prompt_logprobs" in r.json()["error"]["message"], r.text
                    continue
                plp = r.json()["prompt_logprobs"]   # prompt_logprobs 0: each prompt token's own, nothing else
                assert plp[0] is None and len(plp) > 10 and all(len(p) == 1 for p in plp[1:]), (n, eid)
                lps = [next(iter(p.values()))["logprob"] for p in plp[1:]]
                firsts.setdefault(eid, lps)
                assert lps == pytest.approx(firsts[eid], abs=2e-2), (n, eid)   # the same answer every round
            assert h.request("GET", "/readyz").status_code == 200, n   # the server stayed up
        assert len(firsts) == 3
        # each LoRA's prompt logprobs are its own (a dropped or swapped LoRA would show here)
        assert firsts["smollm2-math"] != pytest.approx(firsts["smollm2"], abs=2e-2)
        assert firsts["smollm2-code"] != pytest.approx(firsts["smollm2-math"], abs=2e-2)
        ok = h.chat("What is the capital of France?", model="smollm2", max_tokens=12)
        assert ok.status_code == 200 and "Paris" in ok.json()["choices"][0]["message"]["content"], ok.text
        assert loop.run(engine.healthy())
    finally:
        h.close()
        for eid in loras:   # the session engine is shared: leave it as it was
            with contextlib.suppress(Exception):   # not loaded
                loop.run(engine.remove_adapter(eid))


class _Lent:
    """The session's running vLLM engine lent to the in-process service: ``stop`` leaves it running."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def stop(self) -> None:
        pass
