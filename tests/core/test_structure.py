"""The structure rules of the code base, checked on the source (AST), not by convention.

The layers, lowest first (``docs/architecture.md`` draws them):

0. **foundation** ``coe/*.py``: config schema, shared types, errors, paths, the model catalog
   and resolver (``coe.model_paths``), the plugin table (``coe.plugins``), the expert registry
   (``coe.registry*``, ``coe.profile_records``), log-probability types;
1. **scoring** ``coe/scoring/``: probe files and the scorers that grade an answer to a probe
   (``coe.scoring.served_likelihood``: the reference likelihood as a serving engine measures it);
2. **routers** ``routers/`` and **adapters** ``adapters/`` (side by side: neither is above the other);
3. **serving** ``serving/``: engines and the pool, then the deployment layer, then the HTTP API;
4. **tools** ``coe/tools/``: the CLI, k8s rendering, profiling through a service, the local Ray
   helpers, bootstrap, model preparation: they use every layer and no layer uses them;
5. **bench** ``bench/``: benchmark scripts.

Rules:

1. No module reaches into another module's private names: no ``from coe.x import _y``, no
   ``name._y`` on a name imported from a coe or bench module, and no ``obj._y`` where ``_y`` is a
   private attribute that a class of another module defines (and this module defines none).
2. No module imports a layer above its own. Inside serving, dependencies point one way too:
   api -> deployments -> engines -> adapters. The engines (serving/engines, serving/pool) import
   neither the deployment layer nor the API; the deployment layer does not import the API (the
   composition roots that wire serving together, ``serving/app.py`` and the ingress deployment,
   are exempt); the engine protocol module imports no concrete engine.
3. No import cycle between modules: the module import graph has no strongly connected
   component of more than one module (a package's ``__init__`` is a module of its own).
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {"coe": "coe", "routers": "coe.routers", "adapters": "coe.adapters", "serving": "coe.serving",
           "bench": "bench"}
SKIP = {"bench/results"}   # benchmark output, not code
COMPOSITION_ROOTS = {"coe.serving.app", "coe.serving.deployments.ingress"}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module

    def bound_names(self, *, coe: bool) -> set[str]:
        """Names that imports bind in this module, from our modules (``coe=True``) or from others."""
        names = set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if _ours(node.module) == coe:
                    names.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.asname or a.name.split(".")[0] for a in node.names if _ours(a.name) == coe)
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


def _ours(module: str) -> bool:
    return module.split(".")[0] in {"coe", "bench"}


def _modules() -> list[Module]:
    mods = []
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if any(path.is_relative_to(REPO / skip) for skip in SKIP):
                continue
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
                            for n in names if _ours(source) and _private(n))
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
    # (modules the rule is about, what they must not import, why): the floors inside serving
    (("coe.serving.engines", "coe.serving.pool"), ("coe.serving.deployments", "coe.serving.api", "coe.serving.app"),
     "engines are below the deployment layer and the API"),
    (("coe.serving.deployments",), ("coe.serving.api", "coe.serving.app"), "the deployment layer is below the API"),
]
CONCRETE_ENGINES = ("coe.serving.engines.hf", "coe.serving.engines.vllm_engine", "coe.serving.engines.mixture",
                    "coe.serving.pool")

# The layers, lowest first (see the module docstring). A module is in the layer of the longest
# prefix listed; everything else under coe is the foundation.
LAYERS = ["foundation", "scoring", "routers and adapters", "serving", "tools", "bench"]
LAYER_OF = {
    "coe": "foundation",
    "coe.scoring": "scoring",
    "coe.routers": "routers and adapters",
    "coe.adapters": "routers and adapters",
    "coe.serving": "serving",
    "coe.configs": "foundation",
    "coe.tools": "tools",
    "bench": "bench",
}


def layer(module: str) -> int | None:
    """The layer index of ``module`` (None for a module that is not ours)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        name = LAYER_OF.get(".".join(parts[:n]))
        if name is not None:
            return LAYERS.index(name)
    return None


def _targets(source: str, names: list[str]) -> list[str]:
    """What one import statement reaches: the module, and ``module.name`` for each imported name."""
    return [source] + [f"{source}.{n}" for n in names]


def dependency_violations(modules: list[Module]) -> list[str]:
    problems = []
    for mod in modules:
        own = layer(mod.name)
        rules = [] if mod.name in COMPOSITION_ROOTS else [(bad, why) for scope, bad, why in FORBIDDEN
                                                          if _in(mod.name, *scope)]
        if mod.name == "coe.serving.engines.base":
            rules.append((CONCRETE_ENGINES, "the engine protocol imports no implementation (discovery loads them)"))
        for line, source, names in mod.imports():
            if not _ours(source):
                continue
            targets = _targets(source, names)
            above = next((t for t in targets if (layer(t) or 0) > own), None)
            if above is not None:
                problems.append(f"{_where(mod, line)}: {mod.name} ({LAYERS[own]}) imports {above} "
                                f"({LAYERS[layer(above)]}): a layer above its own")
                continue
            for bad, why in rules:
                hit = next((t for t in targets if _in(t, *bad)), None)
                if hit is not None:
                    problems.append(f"{_where(mod, line)}: {mod.name} imports {hit} ({why})")
                    break
    return problems


def import_graph(modules: list[Module]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` among ``modules``; ``from pkg import name`` counts as an import
    of ``pkg.name`` when that is a module, else of ``pkg``."""
    known = {m.name for m in modules}
    graph: dict[str, set[str]] = {m.name: set() for m in modules}
    for mod in modules:
        for _, source, names in mod.imports():
            subs = [f"{source}.{n}" for n in names if f"{source}.{n}" in known]
            hits = subs if subs and len(subs) == len(names) else [source, *subs]
            graph[mod.name].update(t for t in hits if t in known and t != mod.name)
    return graph


def import_cycles(modules: list[Module]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    graph = import_graph(modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return sorted(cycles)


def test_sources_were_found():
    names = {m.name for m in MODULES}
    assert {"coe.config", "coe.serving.engines.base", "coe.adapters.decode", "coe.routers.base",
            "coe.scoring.base", "coe.tools.cli", "coe.tools.k8s.manifests", "bench.stats"} <= names
    assert all(layer(n) is not None for n in names)


def test_no_module_touches_another_modules_private_names():
    assert private_name_violations(MODULES) == []


def test_dependencies_point_one_way():
    assert dependency_violations(MODULES) == []


def test_no_import_cycles():
    assert import_cycles(MODULES) == []


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
        ("coe.adapters.mole", "from coe.serving.engines.rows import Row\n", "a layer above its own"),
        ("coe.config", "from coe.serving.engines.spec import EngineSpec\n", "a layer above its own"),
        ("coe.config", "def check(self):\n    from coe.routers.base import router_class\n", "a layer above its own"),
        ("coe.plugins", "import coe.routers.builtin.knn\n", "a layer above its own"),
        ("coe.model_paths", "from coe.tools import models\n", "imports coe.tools (tools)"),
        ("coe.scoring.base", "from coe.routers.datasets import RoutingData\n", "a layer above its own"),
        ("coe.serving.api.profiles", "def f():\n    from coe.tools.profiling import task_cell\n", "(tools)"),
        ("coe.routers.embedding", "from coe.tools.models import prepare\n", "a layer above its own"),
        ("coe.tools.cli.serve", "from bench.stats import percentile\n", "(bench)"),
    ],
)
def test_the_dependency_check_catches_each_direction(name, source, expected):
    problems = dependency_violations([Module(name, REPO / "x.py", ast.parse(source))])
    assert len(problems) == 1 and expected in problems[0]


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"coe.a": "import coe.b\n", "coe.b": "def f():\n    from coe.a import x\n"}, [["coe.a", "coe.b"]]),
        ({"coe.a": "from coe import b\n", "coe.b": "from coe.c import y\n", "coe.c": "import coe.a\n"},
         [["coe.a", "coe.b", "coe.c"]]),
        ({"coe.p": "from coe.p.m import x\n", "coe.p.m": "import coe.q\n", "coe.q": ""}, []),
        ({"coe.p": "from coe.p.m import x\n", "coe.p.m": "from coe.p import y\n"}, [["coe.p", "coe.p.m"]]),
    ],
)
def test_the_cycle_check_finds_each_cycle(sources, expected):
    mods = [Module(name, REPO / "x.py", ast.parse(src)) for name, src in sources.items()]
    assert import_cycles(mods) == expected


def test_a_higher_layer_may_import_a_lower_one():
    for name, source in [("coe.tools.cli.serve", "from coe.serving.app import build_app\n"),
                         ("bench.soak", "from coe.tools.cli import main\n"),
                         ("coe.routers.recruit", "from coe.scoring.answers import vote\n"),
                         ("coe.adapters.experts.train", "from coe.routers.datasets import routing_texts\n")]:
        assert dependency_violations([Module(name, REPO / "x.py", ast.parse(source))]) == []
