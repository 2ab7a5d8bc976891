"""Run a script or module with ``coe.*`` importable straight from the checkout, no pip install.

    python bench/checkout_import.py SCRIPT.py [ARGS...]
    python bench/checkout_import.py -m MODULE [ARGS...]        (e.g. -m pytest tests/pool -m gpu)

The package installs under one namespace (pyproject's ``[tool.setuptools.package-dir]``:
``coe.serving`` is the folder ``serving/``, ``coe.adapters`` is ``adapters/``, ...). Where
there is no install — a lent GPU machine gets a bare copy of the tree — :func:`install` puts
the repository root on ``sys.path`` (for ``coe`` itself, ``bench`` and ``tests``) and a
meta-path finder in front that maps each ``coe.<name>`` of that table to its folder, the way
setuptools' editable finder does. The table is read from pyproject.toml, so it cannot drift.

Where ``coe`` is installed already (editable or a wheel), the checkout still wins: the finder
and the repository root come first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_dirs(repo: Path = REPO) -> dict[str, Path]:
    """``{"coe.serving": <repo>/serving, ...}`` from pyproject.toml (without the plain ``coe``)."""
    import tomllib

    table = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: repo / folder for name, folder in table.items() if name != folder}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds the mapped packages (``coe.serving`` → ``serving/``); submodules follow ``__path__``."""

    def __init__(self, mapping: dict[str, Path]) -> None:
        self.mapping = mapping

    def find_spec(self, fullname, path=None, target=None):
        folder = self.mapping.get(fullname)
        if folder is None or not (folder / "__init__.py").is_file():
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )


def install(repo: Path = REPO) -> CheckoutFinder:
    """Make ``coe.*`` (and ``bench``, ``tests``) importable from ``repo``; idempotent.

    Returns the finder. Call it before anything imports ``coe``: a ``coe`` already imported
    from elsewhere is dropped from ``sys.modules`` so the checkout's is used.
    """
    for finder in sys.meta_path:
        if isinstance(finder, CheckoutFinder):
            return finder
    root = str(repo)
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    for name in [m for m in sys.modules if m == "coe" or m.startswith("coe.")]:
        del sys.modules[name]
    finder = CheckoutFinder(package_dirs(repo))
    sys.meta_path.insert(0, finder)
    return finder


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    install()
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit("checkout_import: -m needs a module name")
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
