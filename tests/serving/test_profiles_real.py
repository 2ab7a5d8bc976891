"""Runtime and CLI likelihood profiles on the real transformers engine (tiny llama + tiny peft
LoRA): the engine's prompt log-probabilities on the encode_chat tokens give the same outcome as
the in-process likelihood (coe.scoring.likelihood), so the committed profile data, the CLI through a
service and the service's background profile of a new expert measure one thing."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from coe.scoring.probes import Probe
from tests.helpers import LoopThread
from tests.serving.test_profiles import MATH, REFERENCE, World, write_world

PROBES = [Probe(id="a", query="what is the capital of france ?", scorer="reference_nll", reference="paris is the city ."),
          Probe(id="b", query="hello world", scorer="reference_nll", reference="hello")]


def test_cli_likelihood_through_the_service_equals_in_process(tmp_path, tiny_llama_dir, tiny_loras):
    import httpx
    from transformers import AutoTokenizer

    from coe.config import parse_config
    from coe.tools.profiling import likelihood_table, profile_likelihood_service
    from tests.serving.serving_helpers import ADMIN, Harness, tiny_config_dict

    data = tiny_config_dict(tiny_llama_dir, tiny_loras, tmp_path, flaky=False)
    (tmp_path / "coe.yaml").write_text(yaml.safe_dump(data))
    lt = LoopThread()
    h = Harness(lt, parse_config(data), tmp_path)
    try:
        tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
        out = tmp_path / "lik.jsonl"
        run = lt.run(profile_likelihood_service(
            "http://coe", PROBES, {"tiny": 1.0, "tiny-a": 2.0}, {"tiny": tok, "tiny-a": tok}, out,
            headers={"Authorization": f"Bearer {ADMIN}"}, progress=False, transport=httpx.ASGITransport(app=h.app)))
    finally:
        h.close()
        lt.close()
    assert run.written == 2 and not run.failures
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    table, tokens = likelihood_table(PROBES, str(tmp_path / "coe.yaml"), ["tiny", "tiny-a"])
    for pid, row in rows.items():
        for e in ("tiny", "tiny-a"):
            assert row["detail"][e]["nll"] == pytest.approx(table[pid][e], abs=2e-4), (pid, e)
            assert row["outcomes"][e] == pytest.approx(math.exp(-table[pid][e]), rel=5e-4)
        assert row["costs"]["tiny-a"] == 2 * row["costs"]["tiny"] == 2 * tokens[pid]
    assert table["a"]["tiny"] != table["a"]["tiny-a"]   # the LoRA is measured, not its base


def test_background_profile_on_the_real_engine_measures_the_lora(tmp_path, tiny_llama_dir, tiny_loras):
    from coe.serving.api.backend import LocalBackend
    from coe.serving.deployments.spec import plan_servers
    from coe.tools.profiling import likelihood_table

    config = write_world(tmp_path, tiny_llama_dir, adapter_roots=[tiny_loras[0].parent])
    backend = LocalBackend(plan_servers(list(config.experts), base_dir=tmp_path, batching=config.serving.batching))
    lt = LoopThread()
    lt.run(backend.start())
    w = World(lt, config, tmp_path, backend)
    try:
        body = {"id": "new", "kind": "lora", "base": "base", "adapter": str(tiny_loras[0]), "description": "new",
                "profile": {"probe": str(tmp_path / "probes" / "same.jsonl"), "budget": 4, "strategy": "adaptive"}}
        r = w.request("POST", "/v1/experts", json=body)
        assert r.status_code == 201, r.text
        prof = w.wait("new", timeout=120)
        assert prof["state"] == "done" and prof["failed"] == 0, prof
        assert prof["strategy"] == "adaptive" and prof["ability"]["answered"] == prof["probes_done"] == 4, prof
        stored = {o.query: o for o in w.registry.profile_outcomes()}
    finally:
        lt.run(w.app.state.profiles.close())
        lt.run(backend.stop())
        lt.close()
    assert len(stored) == 4
    cfg = yaml.safe_load(json.dumps(config.model_dump(mode="json", exclude_unset=True)))
    cfg["experts"].append({"id": "new", "kind": "lora", "base": "base", "adapter": str(tiny_loras[0])})
    (tmp_path / "coe.yaml").write_text(yaml.safe_dump(cfg))
    probes = [Probe(id=o.probe_id, query=q, scorer="reference_nll",
                    reference=REFERENCE["math" if q in MATH else "code"]) for q, o in stored.items()]
    table, _ = likelihood_table(probes, str(tmp_path / "coe.yaml"), ["new"])
    for p in probes:
        assert stored[p.query].detail["nll"] == pytest.approx(table[p.id]["new"], abs=2e-4)
