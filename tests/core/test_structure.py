"""The structure rules of the code base, checked on the source (AST), not by convention.

1. No module reaches into another module's private names: no ``from coe.x import _y``, no
   ``name._y`` on a name imported from a coe module, and no ``obj._y`` where ``_y`` is a private
   attribute that a coe class defines in another module (and this module defines none).
2. Dependencies point one way: api -> deployments -> engines -> adapters -> core. Concretely:
   the engines (serving/engines, serving/pool) import neither the deployment layer nor the API;
   the deployment layer does not import the API (the composition roots that wire the layers
   together, ``serving/app.py`` and the ingress deployment, are exempt); adapters import nothing
   from serving; the core modules (config, types, errors, paths, models, registry, plugins) import
   neither serving, adapters, routers nor the tools beside the layers (cli, k8s, eval, profiling);
   the engine protocol module imports no concrete engine.
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"coe": "coe", "routers": "coe.routers", "adapters": "coe.adapters", "serving": "coe.serving"}
COMPOSITION_ROOTS = {"coe.serving.app", "coe.serving.deployments.ingress"}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module

    def bound_names(self, *, coe: bool) -> set[str]:
        """Names that imports bind in this module, from coe modules (``coe=True``) or from others."""
        names = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("coe") == coe:
                    names.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("coe") == coe)
        return names

    def imports(self) -> list[tuple[int, str, list[str]]]:
        """``(line, module, imported names)`` of every absolute import, lazy ones included."""
        out = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((node.lineno, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                out.extend((node.lineno, a.name, []) for a in node.names)
        return out

    def private_attrs_defined(self) -> set[str]:
        """Private names this module defines: methods, class attributes, ``x._y = ...`` targets."""
        names = set()
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
        return {n for n in names if _private(n)}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules() -> list[Module]:
    mods = []
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            mods.append(Module(".".join([package, *parts]), path, ast.parse(path.read_text(), str(path))))
    return mods


MODULES = _modules()


def _where(mod: Module, line: int) -> str:
    return f"{mod.path.relative_to(REPO)}:{line}"


def private_name_violations(modules: list[Module]) -> list[str]:
    """Every access of one module to another module's private names (see the module docstring)."""
    owners: dict[str, set[str]] = {}  # private attribute -> modules defining it
    for mod in modules:
        for name in mod.private_attrs_defined():
            owners.setdefault(name, set()).add(mod.name)
    problems = []
    for mod in modules:
        own = mod.private_attrs_defined()
        imported, foreign = mod.bound_names(coe=True), mod.bound_names(coe=False)
        for line, source, names in mod.imports():
            problems.extend(f"{_where(mod, line)}: imports private {n} from {source}"
                            for n in names if source.startswith("coe") and _private(n))
        for node in ast.walk(mod.tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"} | foreign:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in imported:
                problems.append(f"{_where(mod, node.lineno)}: {ast.unparse(node)} reads a private name of an imported module or class")
            elif node.attr not in own and owners.get(node.attr, set()) - {mod.name}:
                where = ", ".join(sorted(owners[node.attr]))
                problems.append(f"{_where(mod, node.lineno)}: {ast.unparse(node)} reaches into a private attribute of {where}")
    return problems


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


FORBIDDEN = [
    # (modules the rule is about, what they must not import, why)
    (("coe.serving.engines", "coe.serving.pool"), ("coe.serving.deployments", "coe.serving.api", "coe.serving.app"),
     "engines are below the deployment layer and the API"),
    (("coe.serving.deployments",), ("coe.serving.api", "coe.serving.app"), "the deployment layer is below the API"),
    (("coe.adapters",), ("coe.serving",), "adapters are below the engines"),
]
# the foundation every layer uses; the CLI, k8s, eval and profiling tools sit beside the layers
CORE = {"coe.config", "coe.types", "coe.errors", "coe.paths", "coe.models", "coe.registry", "coe.registry_db",
        "coe.registry_schema", "coe.plugins"}
# The core knows no plugin and no tool: a router, an engine or a scorer is looked up by name where
# the config is used (coe.routers.check_router_config), never from the config schema.
CORE_FORBIDDEN = ("coe.serving", "coe.adapters", "coe.routers", "coe.eval", "coe.cli", "coe.k8s", "coe.profiling",
                  "coe.ray_local", "coe.bootstrap")
CONCRETE_ENGINES = ("coe.serving.engines.hf", "coe.serving.engines.vllm_engine", "coe.serving.engines.mixture",
                    "coe.serving.pool")


def dependency_violations(modules: list[Module]) -> list[str]:
    problems = []
    for mod in modules:
        if mod.name in COMPOSITION_ROOTS:
            continue
        rules = [(bad, why) for scope, bad, why in FORBIDDEN if _in(mod.name, *scope)]
        if mod.name in CORE:
            rules.append((CORE_FORBIDDEN, "the core is below everything"))
        if mod.name == "coe.serving.engines.base":
            rules.append((CONCRETE_ENGINES, "the engine protocol imports no implementation (discovery loads them)"))
        for line, source, names in mod.imports():
            targets = [source] + [f"{source}.{n}" for n in names]
            for bad, why in rules:
                hit = next((t for t in targets if _in(t, *bad)), None)
                if hit is not None:
                    problems.append(f"{_where(mod, line)}: {mod.name} imports {hit} ({why})")
                    break
    return problems


def test_sources_were_found():
    names = {m.name for m in MODULES}
    assert {"coe.config", "coe.serving.engines.base", "coe.adapters.decode", "coe.routers.base"} <= names


def test_no_module_touches_another_modules_private_names():
    assert private_name_violations(MODULES) == []


def test_dependencies_point_one_way():
    assert dependency_violations(MODULES) == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from coe.serving.engines.hf import HFEngine, _Row\n", "imports private _Row"),
        ("from coe.adapters import mole\nx = mole._weights\n", "mole._weights reads a private name"),
        ("def f(runner):\n    return runner._helper_of_a\n", "reaches into a private attribute of coe.a"),
    ],
)
def test_the_private_name_check_catches_each_kind(source, expected):
    owner = Module("coe.a", REPO / "a.py", ast.parse("class A:\n    def _helper_of_a(self):\n        pass\n"))
    probe = Module("coe.b", REPO / "b.py", ast.parse(source))
    problems = private_name_violations([owner, probe])
    assert len(problems) == 1 and expected in problems[0]


def test_own_private_names_and_self_are_allowed():
    source = "class B:\n    def _x(self):\n        return self._y\n\ndef g(b):\n    return b._x()\n"
    assert private_name_violations([Module("coe.b", REPO / "b.py", ast.parse(source))]) == []


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("coe.serving.engines.mixture", "from coe.serving.deployments.spec import ServerSpec\n", "engines are below"),
        ("coe.serving.pool.engine", "def f():\n    import coe.serving.api.service\n", "engines are below"),
        ("coe.serving.engines.base", "from coe.serving.engines import hf\n", "imports no implementation"),
        ("coe.adapters.mole", "from coe.serving.engines.rows import Row\n", "adapters are below"),
        ("coe.config", "from coe.serving.engines.spec import EngineSpec\n", "the core is below"),
        ("coe.config", "def check(self):\n    from coe.routers.base import router_class\n", "the core is below"),
        ("coe.plugins", "import coe.routers.builtin.knn\n", "the core is below"),
    ],
)
def test_the_dependency_check_catches_each_direction(name, source, expected):
    problems = dependency_violations([Module(name, REPO / "x.py", ast.parse(source))])
    assert len(problems) == 1 and expected in problems[0]
