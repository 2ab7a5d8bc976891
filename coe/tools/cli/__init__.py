"""The ``coe`` command line.

Subcommands register themselves: every module in this package defines
``register(subparsers)`` which adds its parser(s) and sets ``func`` (a callable taking the
parsed ``argparse.Namespace`` and returning an exit code). Adding a command means adding a
file here; nothing central to edit. Heavy libraries are imported inside the ``func``s.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from coe.errors import CoEError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coe", description="Composition-of-Experts router service")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except CoEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
