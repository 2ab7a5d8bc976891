"""Plugins: register by name with a decorator, refuse duplicates, discover built-ins.

Routers, engines, scorers, embedding backends and skill extractors are all plugins: each
registers itself in its own module (``@register_router("knn")``) and the code that uses them
looks them up by name. :class:`Plugins` is that pattern once::

    _ENGINES = Plugins("engine", packages=("coe.serving.engines",), error=ConfigError)

    @_ENGINES.register("hf")
    class HFEngine(Engine): ...

    _ENGINES.get("hf")      # the class; an unknown name raises ``error`` listing the known ones

The built-in plugins are found lazily, the first time a name is missing or the names are
listed, by importing the listed ``modules`` and every public module of the listed
``packages``, so the protocol module never imports its implementations.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from coe.errors import CoEError, ConfigError, available

T = TypeVar("T")


class Plugins(Generic[T]):
    """Named plugins of one ``kind`` (a word for messages: "router", "engine"...).

    ``modules``/``packages``: what to import to find the built-ins (dotted names; a package's
    modules whose names start with ``_`` are skipped). ``error``: the :class:`CoEError` subclass
    an unknown name raises. ``stamp_name``: set ``plugin.name = name`` on registration (for
    classes that report their own name). Thread-safe; discovery runs until it has once succeeded.
    """

    def __init__(
        self,
        kind: str,
        *,
        modules: Iterable[str] = (),
        packages: Iterable[str] = (),
        error: type[CoEError] = ConfigError,
        stamp_name: bool = True,
    ) -> None:
        self.kind = kind
        self.modules = tuple(modules)
        self.packages = tuple(packages)
        self.error = error
        self.stamp_name = stamp_name
        self._plugins: dict[str, T] = {}
        self._discovered = not (self.modules or self.packages)
        self._lock = threading.Lock()

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: make ``plugin`` available under ``name``.

        Raises ValueError when another plugin already holds ``name`` (registering the same
        object again, as a module reload does, is allowed)."""

        def deco(plugin: T) -> T:
            with self._lock:
                held = self._plugins.get(name)
                if held is not None and held is not plugin:
                    owner = getattr(held, "__module__", None) or type(held).__module__
                    raise ValueError(f"{self.kind} {name!r} is already registered by {owner}")
                if self.stamp_name:
                    plugin.name = name  # type: ignore[attr-defined]
                self._plugins[name] = plugin
            return plugin

        return deco

    def get(self, name: str) -> T:
        """The plugin registered under ``name``; raises ``error`` naming the available ones."""
        plugin = self._plugins.get(name)
        if plugin is None:
            self.discover()
            plugin = self._plugins.get(name)
        if plugin is None:
            raise self.error(f"unknown {self.kind} {name!r}; available: {available(self._plugins)}")
        return plugin

    def names(self) -> list[str]:
        """Every registered name, the built-ins included, sorted."""
        self.discover()
        return sorted(self._plugins)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._plugins

    def discover(self) -> None:
        """Import the built-in modules so their registrations run (once; idempotent)."""
        # No lock around the imports: a module registering while another thread imports it
        # would wait on both locks. Python's import lock makes a repeated import harmless.
        if self._discovered:
            return
        for module in self.modules:
            importlib.import_module(module)
        for package in self.packages:
            pkg = importlib.import_module(package)
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package}.{info.name}")
        self._discovered = True
