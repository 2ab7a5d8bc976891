"""``coe models list|prepare``."""

from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("models", help="list or prepare the built-in offline models")
    cmds = parser.add_subparsers(dest="models_command", metavar="ACTION")
    cmds.required = True
    lst = cmds.add_parser("list", help="built-in aliases and whether they are prepared")
    lst.set_defaults(func=_list)
    prep = cmds.add_parser("prepare", help="materialise built-in models into $COE_HOME/models")
    prep.add_argument("aliases", nargs="*", help="aliases to prepare (default: all)")
    prep.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    prep.add_argument("--no-verify", action="store_true", help="skip re-checking checksums of prepared models")
    prep.add_argument("--quiet", action="store_true")
    prep.add_argument("--corpus", metavar="DIR", help="text folder for models tuned on local text "
                      "(minilm-l6-m2v-tuned; default $COE_CORPUS, else ../shared/data when present)")
    prep.set_defaults(func=_prepare)


def _list(args) -> int:
    from coe.model_paths import BUILTIN, is_prepared
    from coe.paths import models_dir

    for alias, m in BUILTIN.items():
        state = "prepared" if is_prepared(alias) else "not prepared"
        print(f"{alias:24} {m.kind:9} {state:13} {m.description}  [{m.source}]")
    print(f"cache: {models_dir()}")
    return 0


def _prepare(args) -> int:
    from coe.model_paths import BUILTIN, is_prepared
    from coe.tools.models import prepare

    for alias in args.aliases or list(BUILTIN):
        if not args.aliases and BUILTIN[alias].needs_corpus and not is_prepared(alias) and not args.corpus:
            # built from local text (minutes of MiniLM over a corpus), and not the default: only on request
            print(f"{alias}: skipped (built on request: `coe models prepare {alias} [--corpus DIR]`)")
            continue
        path = prepare(alias, force=args.force, verify=not args.no_verify, quiet=args.quiet, corpus=args.corpus)
        print(f"{alias}: {path}")
    return 0
