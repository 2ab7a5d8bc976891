"""``coe experts list|add|remove|profile``: the admin endpoints of a running service, and profiling."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("experts", help="list, register or remove experts of a running service")
    p.add_argument("--url", default=os.environ.get("COE_URL"), help="service URL (default: $COE_URL or the config's host:port)")
    p.add_argument("--config", default=None, help="config whose serving.host/port/admin key to use (default: the embedded one)")
    p.add_argument("--admin-key", default=None, help="admin key (default: the config's, or $COE_ADMIN_KEY)")
    cmds = p.add_subparsers(dest="experts_command", metavar="ACTION")
    cmds.required = True
    cmds.add_parser("list", help="every expert, where it comes from and whether it is ready").set_defaults(func=_list)
    add = cmds.add_parser("add", help="register a LoRA (--base, --adapter) or a whole model (--model)")
    add.add_argument("id")
    add.add_argument("--base", help="model expert the LoRA runs on")
    add.add_argument("--adapter", help="PEFT LoRA folder (must lie under the service's serving.adapter_roots)")
    add.add_argument("--model", help="built-in alias, folder or hub id of a whole model")
    add.add_argument("--engine", choices=["hf", "vllm"], default=None, help="engine of a whole model")
    add.add_argument("--description", default="")
    add.add_argument("--example", action="append", default=[], help="an example query (repeatable)")
    add.add_argument("--skill", action="append", default=[], help="a skill keyword (repeatable)")
    add.add_argument("--cost", type=float, default=None)
    add.add_argument("--fallback", default=None)
    add.add_argument("--profile-probe", default=None,
                     help="measure the expert in the background on this probe set (built-in name, e.g. 'default', "
                          "or a file under the service's serving.probe_roots); its outcomes refit the router")
    add.add_argument("--profile-budget", type=int, default=None, help="how many probes to measure it on")
    add.set_defaults(func=_add)
    show = cmds.add_parser("show", help="one expert and its runtime profile's progress")
    show.add_argument("id")
    show.set_defaults(func=_show)
    rm = cmds.add_parser("remove", help="remove a registered expert")
    rm.add_argument("id")
    rm.set_defaults(func=_remove)
    prof = cmds.add_parser(
        "profile",
        help="run experts on a probe set through the service, score the answers, write routing outcomes (JSONL)",
    )
    prof.add_argument("probes", help="probe file (JSONL, see coe.scoring.probes)")
    prof.add_argument("--expert", action="append", default=[], help="expert id to profile (repeatable; default: all)")
    prof.add_argument("--out", required=True, help="outcome JSONL to write (appended; a re-run, or another --expert, fills only the cells it lacks)")
    prof.add_argument("--concurrency", type=int, default=4)
    prof.add_argument("--max-tokens", type=int, default=256)
    prof.add_argument("--limit", type=int, default=None, help="only the first N probes")
    prof.add_argument("--no-progress", action="store_true")
    prof.add_argument(
        "--likelihood", action="store_true",
        help="score by the reference answer's likelihood (exp(-NLL per token)) from the service's prompt "
             "log-probabilities, instead of generating and scoring answers",
    )
    prof.add_argument("--in-process", action="store_true",
                      help="with --likelihood: compute it in this process with the config's models (--config) "
                           "instead of through the service")
    prof.set_defaults(func=_profile)


def _client(args):
    import httpx

    from coe.config import load_config

    config = load_config(args.config)
    url = args.url or f"http://{config.serving.host}:{config.serving.port}"
    key = args.admin_key or os.environ.get(config.serving.admin_key_env)   # (a key inline in the config is refused)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=900)


def _call(args, method: str, path: str, **kw):
    import httpx

    from coe.errors import CoEError

    try:
        with _client(args) as client:
            r = client.request(method, path, **kw)
    except httpx.HTTPError as err:
        raise CoEError(f"cannot reach the service: {err}") from None
    if r.status_code >= 400:
        try:
            msg = r.json()["error"]["message"]
        except Exception:  # noqa: BLE001
            msg = r.text
        raise CoEError(f"HTTP {r.status_code}: {msg}")
    return r.json()


def _list(args) -> int:
    for e in _call(args, "GET", "/v1/experts"):
        state = "ready" if e["ready"] else f"NOT READY ({e['error']})"
        base = e["config"].get("base") or e["config"].get("model") or ""
        print(f"{e['id']:24} {e['kind']:8} {e['source']:9} {base:28} {state}")
    return 0


def _add(args) -> int:
    from pathlib import Path

    from coe.errors import InvalidRequestError

    body: dict = {"id": args.id, "description": args.description, "examples": args.example, "skills": args.skill}
    if args.cost is not None:
        body["cost"] = args.cost
    if args.fallback:
        body["fallback"] = args.fallback
    if args.adapter:
        if not args.base:
            raise InvalidRequestError("a LoRA expert needs --base (the model expert it runs on)")
        body.update(kind="lora", base=args.base, adapter=str(Path(args.adapter).expanduser().resolve()))
    elif args.model:
        body.update(kind="model", model=args.model)
        if args.engine:
            body["engine"] = {"kind": args.engine}
    else:
        raise InvalidRequestError("give --base and --adapter (a LoRA) or --model (a whole model)")
    if (args.profile_probe is None) != (args.profile_budget is None):
        raise InvalidRequestError("give --profile-probe and --profile-budget together")
    if args.profile_probe is not None:
        probe = args.profile_probe
        if Path(probe).expanduser().exists():   # a file: the service checks it lies under its probe roots
            probe = str(Path(probe).expanduser().resolve())
        body["profile"] = {"probe": probe, "budget": args.profile_budget}
    e = _call(args, "POST", "/v1/experts", json=body)
    print(f"registered {e['id']} ({e['kind']}) on {e['server']}")
    if e.get("profile"):
        print(f"profile {e['profile']['state']}: {e['profile']['total']} request(s); follow it with "
              f"`coe experts show {e['id']}`")
    return 0


def _show(args) -> int:
    e = _call(args, "GET", f"/v1/experts/{args.id}")
    state = "ready" if e["ready"] else f"NOT READY ({e['error']})"
    print(f"{e['id']:24} {e['kind']:8} {e['source']:9} {state}")
    p = e.get("profile")
    if p is None:
        print("profile: none (routed by its description, or by the fitted router's data)")
    else:
        print(f"profile: {p['state']} {p['done']}/{p['total']} ({p['failed']} failed) on {p['probe']} "
              f"budget {p['budget']}" + (f"; error: {p['error']}" if p.get("error") else ""))
    return 0


def _remove(args) -> int:
    _call(args, "DELETE", f"/v1/experts/{args.id}")
    print(f"removed {args.id}")
    return 0


def _profile(args) -> int:
    import asyncio
    from pathlib import Path

    from coe.errors import InvalidRequestError
    from coe.scoring.probes import check_probe_file
    from coe.tools.profiling import expert_costs, profile_experts, profile_summary

    if args.concurrency < 1 or args.max_tokens < 1:
        raise InvalidRequestError("--concurrency and --max-tokens must be at least 1")
    probes = check_probe_file(args.probes)[: args.limit]
    if args.in_process and not args.likelihood:
        raise InvalidRequestError("--in-process applies to --likelihood only")
    if args.likelihood and args.in_process:
        from coe.config import load_config
        from coe.tools.profiling import profile_likelihood

        config = load_config(args.config)
        costs = {e.id: float(e.cost) for e in config.experts if e.kind in ("model", "lora")}
        run = profile_likelihood(probes, args.config, expert_costs(lambda _: [
            {"id": i, "config": {"cost": c}} for i, c in costs.items()], args.expert), Path(args.out))
        print(profile_summary(run, Path(args.out)))
        return 0
    experts = expert_costs(lambda path: _call(args, "GET", path), args.expert)
    with _client(args) as client:
        url, headers = str(client.base_url), dict(client.headers)
    auth = {k: v for k, v in headers.items() if k.lower() == "authorization"}
    if args.likelihood:
        from coe.tools.profiling import profile_likelihood_service, service_tokenizers

        tokenizers = service_tokenizers(_call(args, "GET", "/v1/experts"), list(experts))
        run = asyncio.run(profile_likelihood_service(
            url, probes, experts, tokenizers, Path(args.out), concurrency=args.concurrency, headers=auth,
            progress=not args.no_progress))
        print(profile_summary(run, Path(args.out)))
        return 0
    run = asyncio.run(profile_experts(
        url, probes, experts, Path(args.out), concurrency=args.concurrency, max_tokens=args.max_tokens,
        headers=auth, progress=not args.no_progress))
    print(profile_summary(run, Path(args.out)))
    return 0
