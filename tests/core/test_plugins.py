"""The one plugin table (coe.plugins.Plugins) behind routers, engines, scorers, embedding backends and skill extractors."""

from __future__ import annotations

import sys

import pytest

from coe.errors import ConfigError, RouterNotFoundError
from coe.plugins import Plugins


def test_register_get_names_and_duplicates():
    reg: Plugins[type] = Plugins("widget")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A and A.name == "a" and reg.names() == ["a"] and "a" in reg
    assert reg.register("a")(A) is A  # the same class again (a module reload) is fine
    with pytest.raises(ValueError, match="widget 'a' is already registered by"):
        reg.register("a")(type("B", (), {}))
    with pytest.raises(ConfigError, match=r"unknown widget 'z'; available: a$"):
        reg.get("z")


def test_functions_keep_their_name_and_the_error_type_is_chosen():
    reg: Plugins = Plugins("backend", stamp_name=False, error=RouterNotFoundError)

    def factory():
        return 1

    reg.register("f")(factory)
    assert reg.get("f") is factory and factory.__name__ == "factory" and not hasattr(factory, "name")
    with pytest.raises(RouterNotFoundError, match="available: f"):
        reg.get("g")


def test_builtins_are_discovered_lazily(tmp_path, monkeypatch):
    pkg = tmp_path / "coe_plugin_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from coe.plugins import Plugins\nREG = Plugins('thing', packages=[__name__])\n")
    (pkg / "one.py").write_text("from coe_plugin_probe import REG\n@REG.register('one')\nclass One:\n    pass\n")
    (pkg / "_private.py").write_text("raise RuntimeError('private modules are not plugins')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import coe_plugin_probe

        assert "coe_plugin_probe.one" not in sys.modules  # nothing imported until asked
        assert coe_plugin_probe.REG.get("one").__name__ == "One"
        assert coe_plugin_probe.REG.names() == ["one"]
    finally:
        for name in [m for m in sys.modules if m.startswith("coe_plugin_probe")]:
            del sys.modules[name]

