"""``coe serve`` as an operator runs it, on the tiny config (tiny llama on the transformers engine,
tiny LoRAs, the centroid router on minilm):

* started in the background by a shell (which leaves SIGINT ignored) it stops on SIGINT and
  leaves no Ray, Serve or engine process behind;
* the local Ray listens on 127.0.0.1 only;
* the admin key (from the environment) works but is in no file under Ray's session folder, in
  no log and not in ``/metrics``;
* a plan that does not fit the local Ray fails at once, naming the demand and the supply.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.serving.serving_helpers import tiny_config_dict

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_file(folder: Path, tiny_llama_dir, tiny_loras, serving_root, **resources) -> Path:
    root = folder / "root"
    root.mkdir()
    (root / "adapters").symlink_to(serving_root / "adapters")
    data = tiny_config_dict(tiny_llama_dir, tiny_loras, root, flaky=False)
    for expert in data["experts"]:
        if expert["id"] in resources:
            expert["resources"] = resources[expert["id"]]
    path = folder / "coe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _home(folder: Path) -> Path:
    """A fresh COE_HOME holding the prepared models (for the router's embedder)."""
    from coe.paths import models_dir

    home = folder / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir())
    return home


def _wait_for(pattern: str, log: Path, proc_alive, timeout: float) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if not proc_alive():
            break
        time.sleep(0.5)
    pytest.fail(f"no {pattern!r} in the output of coe serve:\n" + text[-4000:])


def listening(procs) -> list[str]:
    """``address process`` of every TCP listening socket of the given pids (``ss -ltnp``)."""
    lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout.splitlines()
    return [ln.split()[3] + " " + ln.split()[-1] for ln in lines if any(f"pid={p}," in ln for p in procs)]


def beyond_loopback(sockets: list[str]) -> list[str]:
    return [x for x in sockets if not x.startswith(LOOPBACK)]


def process_tree(pid: int) -> dict[int, float]:
    """pid -> create_time of the process and its descendants."""
    top = psutil.Process(pid)
    return {p.pid: p.create_time() for p in [top, *top.children(recursive=True)]}


def still_running(procs: dict[int, float]) -> list[str]:
    out = []
    for pid, created in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return out


@contextlib.contextmanager
def _serving(folder: Path, config: Path):
    """``coe serve`` started with ``&`` by a non-interactive shell; yields while it serves."""
    key = "k-" + secrets.token_hex(16)
    port = _free_port()
    log = folder / "serve.log"
    env = {**os.environ, "COE_HOME": str(_home(folder)), "COE_ADMIN_KEY": key, "PYTHONUNBUFFERED": "1"}
    cmd = (f"{sys.executable} -m coe.tools.cli serve --config {config} --port {port} --num-cpus 2 "
           f"> {log} 2>&1 & echo $!")
    pid = int(subprocess.run(["sh", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True).stdout)
    alive = lambda: psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    try:
        session = Path(_wait_for(r"ray session (\S+)", log, alive, 120).group(1))
        _wait_for(r"serving at http://", log, alive, 600)
        yield {"pid": pid, "key": key, "port": port, "log": log, "session": session, "alive": alive}
    finally:
        if alive():  # the test failed before stopping it: end the whole tree
            procs = [psutil.Process(p) for p in process_tree(pid)]
            for p in procs:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=30)


def _stop(svc) -> None:
    """SIGINT, as Ctrl-C: wait until it stopped."""
    os.kill(svc["pid"], signal.SIGINT)
    deadline = time.time() + 120
    while svc["alive"]() and time.time() < deadline:
        time.sleep(0.5)
    assert not svc["alive"](), "coe serve ignored SIGINT:\n" + svc["log"].read_text(errors="replace")[-3000:]
    time.sleep(1)


@pytest.fixture(scope="module")
def background_service(tmp_path_factory, tiny_llama_dir, tiny_loras, serving_root, minilm_dir):
    folder = tmp_path_factory.mktemp("ops")
    with _serving(folder, _config_file(folder, tiny_llama_dir, tiny_loras, serving_root)) as svc:
        yield svc


def test_background_service_binds_loopback_keeps_the_key_and_stops_on_sigint(background_service):
    svc = background_service
    base = f"http://127.0.0.1:{svc['port']}"
    key = svc["key"]
    with httpx.Client(base_url=base, timeout=60) as c:
        assert c.get("/v1/experts", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        wrong = c.get("/v1/experts", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and key not in wrong.text
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert key not in c.get("/metrics").text

    # every port the service's processes listen on is on loopback
    procs = process_tree(svc["pid"])
    ours = listening(procs)
    names = " ".join(ours)
    assert "gcs_server" in names and "raylet" in names, ours  # not vacuous: Ray's servers were seen
    assert not beyond_loopback(ours), f"listening beyond loopback: {beyond_loopback(ours)}"

    # the key is in no file of Ray's session folder (logs, runtime-env agent log, sockets aside)
    assert svc["session"].is_dir()
    leaks = []
    for f in svc["session"].rglob("*"):
        if f.is_file() and not f.is_symlink():
            try:
                if key.encode() in f.read_bytes():
                    leaks.append(str(f))
            except OSError:
                pass
    assert not leaks, f"the admin key is written to {leaks}"

    # Ctrl-C (SIGINT) stops it although the shell started it with SIGINT ignored
    _stop(svc)
    out = svc["log"].read_text(errors="replace")
    assert "shutting down (SIGINT)" in out
    assert key not in out
    left = still_running(procs)
    assert not left, "processes left running after the stop:\n" + "\n".join(left)


def test_plan_that_does_not_fit_fails_at_once(tmp_path, tiny_llama_dir, tiny_loras, serving_root):
    config = _config_file(tmp_path, tiny_llama_dir, tiny_loras, serving_root, tiny={"num_cpus": 4})
    env = {**os.environ, "COE_HOME": str(_home(tmp_path)), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "coe.tools.cli", "serve", "--config", str(config), "--port",
                          str(_free_port()), "--num-cpus", "2"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert time.time() - t0 < 120
    err = out.stderr
    assert "not enough free cluster resources for expert-tiny (missing CPU 2.25" in err, err[-2000:]
    assert "expert-tiny: 1 x (CPU 4)" in err and "coe-ingress: 1 x (CPU 0.25)" in err and "node 0: CPU 2" in err


def test_haproxy_ingress_serves_checks_and_stops_clean(request, tmp_path, tiny_llama_dir, tiny_loras, serving_root,
                                                       minilm_dir):
    """``serving.proxy: haproxy``: Serve's HAProxy ingress takes the connections; chat (whole and
    streamed), the body checks and the admin key answer as behind Serve's proxy; only HAProxy's stats
    and metrics ports listen beyond loopback; SIGINT leaves no process and no HAProxy folder."""
    config = _config_file(tmp_path, tiny_llama_dir, tiny_loras, serving_root)
    data = yaml.safe_load(config.read_text())
    data["serving"]["proxy"] = "haproxy"
    config.write_text(yaml.safe_dump(data))
    before = set(Path("/tmp").glob("coe-hap-*"))
    request.addfinalizer(lambda: [shutil.rmtree(p, ignore_errors=True)   # a failed run's, killed before its stop
                                  for p in set(Path("/tmp").glob("coe-hap-*")) - before])
    with _serving(tmp_path, config) as svc:
        chat = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=f"http://127.0.0.1:{svc['port']}", timeout=60) as c:
            r = c.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200 and r.headers["x-coe-expert"] == "tiny", r.text
            assert r.headers.get("x-coe-replica")           # answered by our ingress replica, through HAProxy
            with c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
                assert s.status_code == 200
                assert "data: [DONE]" in "".join(s.iter_text())
            bad = c.post("/v1/chat/completions", content=b"hi", headers={"content-type": "text/plain"})
            assert bad.status_code == 415 and "application/json" in bad.json()["error"]["message"]
            assert c.post("/v1/chat/completions", json={**chat, "max_tokens": -1}).status_code in (400, 422)
            assert c.get("/v1/experts", headers={"Authorization": "Bearer nope"}).status_code == 403
            assert c.get("/readyz").status_code == 200
        private = set(Path("/tmp").glob("coe-hap-*")) - before
        assert len(private) == 1 and list(private.pop().rglob("haproxy.cfg"))   # not in /tmp/haproxy-serve
        procs = process_tree(svc["pid"])
        # beyond loopback: only HAProxy's stats and metrics ports (Serve's template binds them on every
        # interface); its front end and the ingress replica's own HTTP server stay on serving.host
        wide = beyond_loopback(listening(procs))
        assert len(wide) == 2 and all('"haproxy"' in x for x in wide), wide
        assert any(re.match(r"127\.0\.0\.1:3[01]\d{3} .*ServeRepli", x) for x in listening(procs)), listening(procs)
        _stop(svc)
    assert not still_running(procs)
    assert not set(Path("/tmp").glob("coe-hap-*")) - before
