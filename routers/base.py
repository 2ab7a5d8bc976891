"""The router protocol, the router plugins, and saving/loading fitted routers.

A router only *scores*: for a batch of queries it predicts every expert's quality (and, where it
knows, cost). Choosing an expert from the scores (argmax, quality − λ·cost, cheapest above τ)
is the one shared :mod:`coe.routers.policy`. Routers register themselves in their own file with
``@register_router("name")``; registering a name twice is refused.

A fitted router is a folder: ``router.json`` (name, params, experts, costs, embedder, notes)
and ``state.npz`` (its arrays). :func:`load_router` rebuilds it by its registered name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from coe.errors import ConfigError, RouterNotFoundError
from coe.plugins import Plugins

FORMAT_VERSION = 1


class RouterParams(BaseModel):
    """Base of every router's hyperparameters (``router.params`` in the config)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QueryBatch:
    """What a router scores: the query texts and their unit-norm embeddings ``[B, D]``.

    ``outcomes`` (``[B, M]``, the true qualities) is set only in offline evaluation; only the
    ``oracle`` baseline reads it.
    """

    texts: list[str]
    embeddings: np.ndarray | None = None
    outcomes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Scores:
    """Predicted quality ``[B, M]`` per expert (columns in ``experts`` order) and cost ``[M]`` or ``[B, M]``.

    ``uncertainty`` (optional, ``[B, M]``, same scale as ``quality``): the standard error of each
    predicted quality, set only by routers that declare ``gives_uncertainty``. The shared policy
    can send queries whose chosen expert is too uncertain to a designated fallback expert.
    """

    experts: list[str]
    quality: np.ndarray
    cost: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


@dataclass
class FitContext:
    """Extra inputs to ``fit``: per-expert descriptions and skills, a seed, and the embedder."""

    descriptions: dict[str, list[str]] = field(default_factory=dict)
    description_embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    categories: dict[str, str] = field(default_factory=dict)
    skills: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0
    embed: Callable[[list[str]], np.ndarray] | None = None   # texts -> unit-norm [n, D] (skill vocabulary)


class Router:
    """Base class of the router protocol.

    Subclasses set ``name`` (by the decorator), ``Params`` (a :class:`RouterParams`), the class
    flags, and implement :meth:`fit`, :meth:`score`, :meth:`state` and :meth:`set_state`.
    Contract:

    - ``fit(data, embeddings, ctx)``: learn from a :class:`coe.routers.datasets.RoutingData` whose
      rows are embedded in ``embeddings`` ``[N, D]`` (unit norm). Sets ``self.experts`` and
      ``self.costs`` (mean cost per expert, ``[M]``).
    - ``score(batch)`` → :class:`Scores` for the experts in ``self.experts``; pure function of
      the fitted state, safe to call from many threads at once.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[RouterParams]] = RouterParams
    needs_outcomes: ClassVar[bool] = True   # False: usable from descriptions alone (centroid)
    needs_embeddings: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = False    # True only for the oracle (reads the true outcomes)
    gives_uncertainty: ClassVar[bool] = False   # True: score() fills Scores.uncertainty
    # Hyperparameter grid searched by cross-validation on the train split (`coe router fit/eval`).
    cv_grid: ClassVar[dict[str, list[Any]]] = {}

    def __init__(self, params: RouterParams | dict | None = None) -> None:
        self.params = self.validate_params(params)
        self.experts: list[str] = []
        self.costs: np.ndarray | None = None
        self.notes: dict[str, Any] = {}

    @classmethod
    def validate_params(cls, params: RouterParams | dict | None) -> RouterParams:
        if isinstance(params, cls.Params):
            return params
        try:
            return cls.Params.model_validate(dict(params or {}))
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            allowed = ", ".join(cls.Params.model_fields) or "(none)"
            raise ConfigError(f"router {cls.name!r} params are invalid: {problems} (allowed: {allowed})") from None

    # -- protocol ---------------------------------------------------------------------------
    def fit(self, data, embeddings: np.ndarray | None, ctx: FitContext | None = None) -> Router:
        raise NotImplementedError

    def score(self, batch: QueryBatch) -> Scores:
        raise NotImplementedError

    def coverage(self, batch: QueryBatch) -> np.ndarray | None:
        """``[B]`` cosine similarity of each query to its nearest training query, or None when
        the router keeps no training queries. A query the training data does not cover
        (``router.min_profile_similarity``) is routed as ``router.outside_profile`` says."""
        return None

    def mean_quality(self) -> np.ndarray | None:
        """``[M]`` each expert's mean outcome over the fitted data (what the router predicts where
        it has no local evidence), or None when the router keeps no outcomes. The online router
        scores a query outside the training data by it (``router.outside_profile: profile_mean``)."""
        return None

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that, with params/experts/costs, rebuild the fitted router."""
        return {}

    def set_state(self, arrays: dict[str, np.ndarray]) -> None:
        pass

    # -- helpers ----------------------------------------------------------------------------
    def _set_experts(self, data) -> None:
        self.experts = list(data.models)
        self.costs = data.mean_costs()

    def _scores(self, quality: np.ndarray, uncertainty: np.ndarray | None = None) -> Scores:
        return Scores(experts=list(self.experts), quality=quality, cost=self.costs, uncertainty=uncertainty)


# --------------------------------------------------------------------------- plugins

_ROUTERS: Plugins[type[Router]] = Plugins(
    "router", packages=("coe.routers.builtin",), error=RouterNotFoundError
)


def register_router(name: str):
    """Class decorator: register a :class:`Router` subclass under ``name`` (duplicates refused)."""
    return _ROUTERS.register(name)


def router_names() -> list[str]:
    return _ROUTERS.names()


def router_class(name: str) -> type[Router]:
    """The registered class; :class:`RouterNotFoundError` lists the available names."""
    return _ROUTERS.get(name)


def check_router_config(cfg) -> RouterParams:
    """Check a ``coe.config.RouterConfig`` against the routers: ``name`` is a registered router
    and ``params`` are valid for its own parameter class. Returns the validated params.

    The config schema (core) knows no routers; whoever uses a config (``coe config validate``,
    ``coe serve``, :func:`coe.routers.build_online_router`) calls this. Raises
    :class:`ConfigError` naming the field, what is wrong and what is allowed.
    """
    try:
        cls = router_class(cfg.name)
    except RouterNotFoundError as err:
        raise ConfigError(f"router.name: {err}") from None
    try:
        return cls.validate_params(cfg.params)
    except ConfigError as err:
        raise ConfigError(f"router.params: {err}") from None


def create_router(name: str, params: RouterParams | dict | None = None) -> Router:
    return router_class(name)(params)


# --------------------------------------------------------------------------- persistence


def save_router(router: Router, folder: str | Path, *, embedder: str, extra: dict | None = None) -> Path:
    """Write a fitted router to ``folder`` atomically enough: arrays first, ``router.json`` last."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = router.state()
    np.savez(folder / "state.npz", **arrays)
    meta = {
        "format_version": FORMAT_VERSION,
        "router": router.name,
        "params": router.params.model_dump(mode="json"),
        "experts": list(router.experts),
        "costs": None if router.costs is None else [float(c) for c in router.costs],
        "embedder": embedder,
        "notes": router.notes,
        **(extra or {}),
    }
    tmp = folder / "router.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=_json_default))
    tmp.replace(folder / "router.json")
    return folder


def load_router(folder: str | Path) -> tuple[Router, dict]:
    """Rebuild a router saved by :func:`save_router`; returns ``(router, metadata)``.

    Raises :class:`ConfigError` when the folder is not a fitted router.
    """
    folder = Path(folder)
    meta_path = folder / "router.json"
    if not meta_path.is_file():
        raise ConfigError(f"{folder} is not a fitted router folder (no router.json); make one with `coe router fit`")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise ConfigError(f"{meta_path}: not valid JSON: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{meta_path}: format_version {meta.get('format_version')!r}; supported: {FORMAT_VERSION}")
    router = create_router(meta["router"], meta.get("params"))
    router.experts = list(meta["experts"])
    router.costs = None if meta.get("costs") is None else np.asarray(meta["costs"], dtype=np.float64)
    router.notes = meta.get("notes", {})
    with np.load(folder / "state.npz", allow_pickle=False) as npz:
        router.set_state({k: npz[k] for k in npz.files})
    return router, meta


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
