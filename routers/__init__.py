"""Routers: score experts for a batch of queries; one shared policy chooses.

Light to import: numpy and pydantic only. Embedders, faiss and torch load when first used.
"""

from coe.routers.base import (
    FitContext,
    QueryBatch,
    Router,
    RouterParams,
    Scores,
    check_router_config,
    create_router,
    load_router,
    register_router,
    router_class,
    router_names,
    save_router,
)
from coe.routers.online import OnlineRouter, RoutingDecision, build_online_router
from coe.routers.policy import SelectionPolicy, calibrate

__all__ = [
    "FitContext",
    "OnlineRouter",
    "QueryBatch",
    "Router",
    "RouterParams",
    "RoutingDecision",
    "Scores",
    "SelectionPolicy",
    "build_online_router",
    "calibrate",
    "check_router_config",
    "create_router",
    "load_router",
    "register_router",
    "router_class",
    "router_names",
    "save_router",
]
