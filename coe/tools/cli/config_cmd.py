"""``coe config validate FILE`` and ``coe config schema``."""

from __future__ import annotations

import json


def register(sub) -> None:
    parser = sub.add_parser("config", help="validate a config or print its JSON schema")
    cmds = parser.add_subparsers(dest="config_command", metavar="ACTION")
    cmds.required = True
    validate = cmds.add_parser("validate", help="validate a YAML config (default: the embedded one)")
    validate.add_argument("file", nargs="?", default=None)
    validate.set_defaults(func=_validate)
    schema = cmds.add_parser("schema", help="print the config's JSON schema")
    schema.set_defaults(func=_schema)


def _validate(args) -> int:
    from coe.config import load_config
    from coe.routers import check_router_config

    cfg = load_config(args.file)
    check_router_config(cfg.router)
    kinds = {}
    for e in cfg.experts:
        kinds[e.kind] = kinds.get(e.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"{args.file or 'default config'}: valid ({summary}; router {cfg.router.name})")
    return 0


def _schema(args) -> int:
    from coe.config import config_json_schema

    print(json.dumps(config_json_schema(), indent=2))
    return 0
