"""Generation engines behind one protocol (:class:`coe.serving.engines.base.Engine`), built from
an :class:`~coe.serving.engines.spec.EngineSpec` with ``Engine.from_spec``."""

from coe.serving.engines.base import (
    Capabilities,
    Engine,
    engine_names,
    get_engine_class,
    register_engine,
)
from coe.serving.engines.spec import EngineSpec, MixtureSpec

__all__ = ["Capabilities", "Engine", "EngineSpec", "MixtureSpec", "engine_names", "get_engine_class", "register_engine"]
