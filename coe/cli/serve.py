"""``coe serve``: run the service on Ray Serve (a local Ray unless ``--address``)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the CoE service (OpenAI-compatible) on Ray Serve")
    p.add_argument("--config", default=None, help="config YAML (default: the embedded configs/default.yaml)")
    p.add_argument("--address", default=None, help="an existing Ray cluster (e.g. ray://host:10001 or auto); default: start a local Ray")
    p.add_argument("--host", default=None, help="HTTP host (default: serving.host of the config)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serving.port of the config)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all)")
    p.set_defaults(func=_serve)


def _forwarded_env(config) -> dict[str, str]:
    """Environment the replicas need when they run on a cluster that is not this process's child."""
    import os

    names = ["COE_HOME", config.serving.admin_key_env, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_CPU_KVCACHE_SPACE"]
    return {n: os.environ[n] for n in names if n in os.environ}


def _serve(args) -> int:
    import signal
    import sys
    import time
    from pathlib import Path

    from coe.config import load_config
    from coe.paths import default_config_path

    path = Path(args.config or default_config_path()).expanduser().resolve()
    config = load_config(path)
    host = args.host or config.serving.host
    port = args.port or config.serving.port

    import ray
    from ray import serve

    from coe.serving.app import APP_NAME, build_app

    local = args.address is None
    init = {"address": args.address or "local", "include_dashboard": False, "log_to_driver": True,
            "runtime_env": {"env_vars": _forwarded_env(config)}}
    if local and args.num_cpus is not None:
        init["num_cpus"] = args.num_cpus
    ray.init(**init)

    def _term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        serve.start(http_options={"host": host, "port": port})
        print(f"coe: deploying {len(config.experts)} experts from {path} (engines load first; this takes a while)",
              file=sys.stderr, flush=True)
        serve.run(build_app(config, base_dir=path.parent), name=APP_NAME, route_prefix="/", blocking=False)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        print(f"coe: serving at http://{shown}:{port}/v1  (OpenAI base_url; Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("coe: shutting down", file=sys.stderr, flush=True)
    finally:
        _shutdown(serve, ray, local)
    return 0


def _shutdown(serve, ray, local: bool) -> None:
    """Delete our applications (on a shared cluster) or the whole local Serve + Ray."""
    from coe.serving.app import APP_NAME
    from coe.serving.deployments.ray_deployments import RUNTIME_APP_PREFIX

    try:
        if local:
            serve.shutdown()
        else:
            apps = serve.status().applications
            for name in [APP_NAME] + [a for a in apps if a.startswith(RUNTIME_APP_PREFIX)]:
                if name in apps:
                    serve.delete(name)
    finally:
        ray.shutdown()
