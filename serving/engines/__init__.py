"""Generation engines behind one protocol (:class:`coe.serving.engines.base.Engine`)."""

from coe.serving.engines.base import Engine, get_engine_class, register_engine

__all__ = ["Engine", "get_engine_class", "register_engine"]
