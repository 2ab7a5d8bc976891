"""ServeBackend's per-request work (a fake handle stands in for Ray Serve's; the real one runs in
tests/serving/test_ray_service.py) and the options its deployments get."""

from __future__ import annotations

import asyncio

import pytest

from coe.types import Dispatch, GenerationRequest, StreamDelta

pytest.importorskip("ray.serve")


class FakeHandle:
    """Records the handles ``options`` makes; ``stream.remote`` streams two deltas."""

    def __init__(self, opts: dict | None = None) -> None:
        self.opts = opts or {}
        self.made: list[FakeHandle] = []
        self.calls = 0
        self.stream = self

    def options(self, **kw) -> FakeHandle:
        handle = FakeHandle({**self.opts, **kw})
        self.made.append(handle)
        return handle

    def remote(self, dispatch):
        self.calls += 1

        async def gen():
            yield StreamDelta(text="a")
            yield StreamDelta(text="b", finish_reason="stop", completion_tokens=2)

        return gen()


def _drain(backend, dispatch) -> list[str]:
    async def go():
        return [d.text async for d in backend.stream(dispatch)]

    return asyncio.run(go())


def test_streaming_handles_are_made_once_per_server_and_adapter():
    from coe.serving.deployments.ray_deployments import ServeBackend
    from coe.serving.deployments.spec import adapter_model_id

    base = FakeHandle()
    backend = ServeBackend({"expert-s": base})
    plain = Dispatch(GenerationRequest(request_id="r1"), expert="s", server_id="expert-s")
    lora = Dispatch(GenerationRequest(request_id="r2"), expert="s-math", server_id="expert-s", adapter="s-math",
                    adapter_path="/adapters/math")
    for _ in range(3):
        assert _drain(backend, plain) == ["a", "b"]
        assert _drain(backend, lora) == ["a", "b"]
    model_id = adapter_model_id("s-math", "/adapters/math")
    assert [h.opts for h in base.made] == [{"stream": True, "_by_reference": False},
                                           {"stream": True, "_by_reference": False, "multiplexed_model_id": model_id}]
    assert [h.calls for h in base.made] == [3, 3]

    # a server whose handle changed (registered again) gets a new streaming handle; a removed one none
    again = FakeHandle()
    backend.handles["expert-s"] = again
    assert _drain(backend, plain) == ["a", "b"]
    assert [h.opts for h in again.made] == [{"stream": True, "_by_reference": False}] and len(base.made) == 2
    backend.detach_server("expert-s")
    from coe.errors import ServerDownError

    with pytest.raises(ServerDownError):
        _drain(backend, plain)


def test_replicas_run_their_code_on_serves_own_loop():
    from coe.config import ResourcesConfig
    from coe.serving.deployments.ray_deployments import serve_options
    from coe.serving.deployments.spec import SERVE_ENV

    opts = serve_options("coe-ingress", ResourcesConfig(num_cpus=0.5))
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"] == SERVE_ENV
    assert SERVE_ENV == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                         "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
    assert opts["ray_actor_options"]["num_cpus"] == 0.5


def test_the_ingress_replica_starts_with_two_malloc_arenas_and_expert_servers_do_not():
    """glibc's per-thread arenas made the ingress's RSS creep (bench/results/soak.md)."""
    from coe.config import ResourcesConfig
    from coe.serving.deployments.ray_deployments import serve_options
    from coe.serving.deployments.spec import INGRESS_ENV, SERVE_ENV

    assert INGRESS_ENV == {"MALLOC_ARENA_MAX": "2"}
    opts = serve_options("coe-ingress", ResourcesConfig(num_cpus=0.5), INGRESS_ENV)
    assert opts["ray_actor_options"]["runtime_env"]["env_vars"] == {**SERVE_ENV, **INGRESS_ENV}
    assert "MALLOC_ARENA_MAX" not in serve_options("expert-x", ResourcesConfig())["ray_actor_options"][
        "runtime_env"]["env_vars"]
    assert SERVE_ENV == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                         "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}   # not changed by the merge
