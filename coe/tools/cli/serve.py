"""``coe serve``: run the service on Ray Serve (a local Ray unless ``--address``).

Start-up: the local Ray listens on 127.0.0.1 only and gets no secret through its runtime
environment (``coe.tools.ray_local``); the deployment plan is checked against the cluster's free
resources before anything is deployed (``coe.serving.deployments.capacity``); the wait for the
engines has a deadline. Stop: SIGINT (Ctrl-C, also when started in the background, where the
shell leaves SIGINT ignored), SIGTERM or SIGHUP delete the application, shut the local Ray down
and end every process the service started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the CoE service (OpenAI-compatible) on Ray Serve")
    p.add_argument("--config", default=None, help="config YAML (default: the embedded configs/default.yaml)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (e.g. ray://host:10001 or auto); default: start a local Ray")
    p.add_argument("--host", default=None, help="HTTP host (default: serving.host of the config)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serving.port of the config)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--startup-timeout", type=float, default=1200.0,
                   help="seconds to wait for every engine to load before giving up (default: 1200)")
    p.add_argument("--no-capacity-check", action="store_true",
                   help="deploy even if the plan does not fit the cluster's free resources now (autoscaling clusters)")
    p.set_defaults(func=_serve)


class _Stop(KeyboardInterrupt):
    """Raised in the main thread by the first stop signal."""


def install_stop_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP raise :class:`_Stop` (a KeyboardInterrupt) once; while the
    shutdown runs, further stop signals are ignored so it completes (it has its own deadlines).
    Installed explicitly: a shell starting us in the background leaves SIGINT ignored."""

    def _handler(signum, frame):
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise _Stop(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def _say(msg: str, *, out=None) -> None:
    print(f"coe: {msg}", file=out or sys.stderr, flush=True)


def _serve(args) -> int:
    from pathlib import Path

    from coe.config import load_config
    from coe.paths import default_config_path
    from coe.routers import check_router_config
    from coe.serving.deployments.memtrace import frames_from_env
    from coe.tools.ray_local import WORKER_HOOK, ProcessJanitor, forwarded_env, use_loopback

    path = Path(args.config or default_config_path()).expanduser().resolve()
    config = load_config(path)
    check_router_config(config.router)  # before Ray starts: the ingress would refuse it only at start-up
    frames_from_env()  # a bad COE_TRACEMALLOC is refused here, not by every replica
    host = args.host or config.serving.host
    port = args.port or config.serving.port
    local = args.address is None

    install_stop_handlers()
    janitor = ProcessJanitor()
    haproxy_dir = None
    if local:
        from coe.serving.deployments.spec import check_proxy, private_haproxy_dir, proxy_env

        check_proxy(config.serving.proxy)
        janitor.start()
        use_loopback()  # before `import ray`
        if config.serving.proxy == "haproxy":   # HAProxy's socket and files, private to this service
            haproxy_dir = private_haproxy_dir()
        for key, value in proxy_env(config.serving.proxy, haproxy_dir).items():
            os.environ.setdefault(key, value)   # Serve's proxy (or HAProxy) reads them from the node's environment
    elif config.serving.proxy == "haproxy":
        _say("serving.proxy: haproxy takes effect only where the cluster's nodes started with "
             "RAY_SERVE_ENABLE_HA_PROXY=1 in their environment (the KubeRay manifests set it)")
    import ray
    from ray import serve

    init = {"address": args.address or "local", "include_dashboard": False, "log_to_driver": True}
    if local:
        init["runtime_env"] = {"worker_process_setup_hook": WORKER_HOOK}  # no env_vars: workers inherit ours
        if args.num_cpus is not None:
            init["num_cpus"] = args.num_cpus
    else:
        env = forwarded_env()
        if env:
            init["runtime_env"] = {"env_vars": env}
        _say(f"the keys are not sent to the cluster: its nodes need ${config.serving.admin_key_env} (admin) and, "
             f"for a chat key, ${config.serving.api_key_env} in their own environment")
    try:
        ctx = ray.init(**init)
        ray_processes = janitor.children()  # Ray's GCS, raylet, ...: everything else reparented here is an orphan
        install_stop_handlers()  # ray.init replaces the SIGTERM handler
        session = ctx.address_info.get("session_dir") if hasattr(ctx, "address_info") else None
        if session:
            _say(f"ray session {session}")
        serve.start(http_options={"host": host, "port": port})
        _deploy(config, path.parent, serve, args)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if local:   # Serve's HTTP proxy starts on its own: say "serving" once it answers here
            wait_http(f"http://{shown}:{port}/healthz", timeout_s=60)
        print(f"coe: serving at http://{shown}:{port}/v1  (OpenAI base_url; Ctrl-C stops)", flush=True)
        _watch(janitor, ray_processes)
    except KeyboardInterrupt as stop:
        _say(f"shutting down ({stop.args[0] if stop.args else 'SIGINT'})")
    finally:
        for sig in STOP_SIGNALS:  # nothing interrupts the cleanup
            signal.signal(sig, signal.SIG_IGN)
        try:
            _shutdown(serve, ray, local)
        finally:
            if local:
                left = janitor.stop()
                if left:
                    _say(f"ended {len(left)} process(es) left after Ray's shutdown")
            if haproxy_dir is not None:
                shutil.rmtree(haproxy_dir, ignore_errors=True)
    return 0


def _watch(janitor, known: set[int], period_s: float = 5.0) -> None:
    """Serve until a stop signal; meanwhile end the orphans of dead replicas (local Ray only)."""
    while True:
        time.sleep(period_s)
        ended = janitor.end_orphans(known)
        if ended:
            _say(f"ended {len(ended)} orphaned process(es) of a replica that died: {ended}")


def _deploy(config, base_dir, serve, args) -> None:
    """Check the plan against the cluster, deploy it, wait (with a deadline) until it runs."""
    from coe.serving.app import APP_NAME, build_app, plan
    from coe.serving.deployments.capacity import check_capacity, plan_demand

    specs = plan(config, base_dir=base_dir)
    if APP_NAME in serve.status().applications:  # an update on a shared cluster: the old version holds resources
        _say("updating the running application; its resources are not checked against the free ones")
    elif not args.no_capacity_check:
        check_capacity(plan_demand(config, specs.values()))
    _say(f"deploying {len(config.experts)} experts in {len(specs)} expert servers from {base_dir} "
         "(engines load first; this takes a while)")
    serve._run(build_app(config, base_dir=base_dir), name=APP_NAME, route_prefix="/", _blocking=False)
    wait_running(serve, APP_NAME, timeout_s=args.startup_timeout)


def wait_running(serve, app_name: str, *, timeout_s: float, poll_s: float = 1.0, report_s: float = 30.0) -> None:
    """Return when the Serve application is RUNNING; raise :class:`coe.errors.EngineError` with
    each deployment's state when it fails to deploy or is not running after ``timeout_s``."""
    from coe.errors import EngineError

    t0 = time.monotonic()
    last_report = t0
    while True:
        app = serve.status().applications.get(app_name)
        status = str(getattr(app, "status", "NOT_STARTED"))
        if status.endswith("RUNNING"):
            return
        now = time.monotonic()
        if status.endswith("DEPLOY_FAILED") or now - t0 > timeout_s:
            why = "failed to deploy" if status.endswith("DEPLOY_FAILED") else f"is not running after {timeout_s:.0f} s"
            raise EngineError(f"the service {why}: {_states(app)}")
        if now - last_report >= report_s:
            _say(f"still starting after {now - t0:.0f} s: {_states(app, brief=True)}")
            last_report = now
        time.sleep(poll_s)


def wait_http(url: str, *, timeout_s: float, poll_s: float = 0.5) -> None:
    """Return once ``url`` answers 200; raise :class:`coe.errors.EngineError` naming the port when
    it does not within ``timeout_s`` (another process holds the port, or Serve's proxy failed)."""
    import httpx

    from coe.errors import EngineError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            port = httpx.URL(url).port
            raise EngineError(f"the service is deployed, but nothing answers HTTP at {url} after {timeout_s:.0f} s: "
                              f"is port {port} in use by another process? (--port or serving.port picks another)")
        time.sleep(poll_s)


def _states(app, *, brief: bool = False) -> str:
    if app is None:
        return "the application was not created"
    parts = []
    for name, dep in (getattr(app, "deployments", None) or {}).items():
        status = str(getattr(dep, "status", "?")).rsplit(".", 1)[-1]
        if status == "HEALTHY":
            continue
        msg = _gist(getattr(dep, "message", "") or "")
        parts.append(f"{name} {status}" + ("" if brief or not msg else f" ({msg})"))
    extra = _gist(getattr(app, "message", "") or "")
    if extra and not brief and extra not in " ".join(parts):
        parts.append(extra)
    return "; ".join(parts) or "all deployments healthy"


def _gist(message: str, limit: int = 600) -> str:
    """A Serve status message without its traceback: the last exception line when there is one
    (the full text is in Ray's logs)."""
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    text = errors[-1] if errors else lines[0] if len(lines) == 1 else " ".join(lines[-2:])
    return text[:limit]


def _shutdown(serve, ray, local: bool) -> None:
    """Delete our applications (on a shared cluster) or the whole local Serve + Ray."""
    from coe.serving.app import APP_NAME
    from coe.serving.deployments.ray_deployments import RUNTIME_APP_PREFIX

    if not ray.is_initialized():
        return
    try:
        if local:
            serve.shutdown()
        else:
            apps = serve.status().applications
            for name in [APP_NAME] + [a for a in apps if a.startswith(RUNTIME_APP_PREFIX)]:
                if name in apps:
                    serve.delete(name)
    except Exception as err:  # noqa: BLE001  (still shut Ray down)
        _say(f"could not stop Serve cleanly: {type(err).__name__}")
    finally:
        ray.shutdown()
