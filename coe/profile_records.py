"""The rows of a runtime profile: one measured outcome, and the state of one profile job.

A profile measures one expert on probe queries (``POST /v1/experts`` with ``profile:``, or
``POST /v1/experts/{id}/profile``). Both row types are stored by the expert registry
(:mod:`coe.registry`, tables ``profile_outcomes`` and ``profile_jobs``), shown by the admin API
(``ProfileJob`` is the ``profile`` field of ``GET /v1/experts/{id}``) and read back to rebuild
the fitted router, so every ingress replica and every restart sees the same profile.

Outcomes come in two kinds (:data:`OutcomeKind`), which a router must never mix: ``task``
(0/1: the expert's answer passed the probe's scorer, e.g. exact number or code tests) and
``likelihood`` (``exp(-mean NLL)`` of the probe's reference answer, with ``detail.nll``). The
kind of a routing data file is :func:`data_outcome_kind`; of a fitted router,
:func:`fitted_outcome_kind` (``outcome_kind`` in its router.json, inferred for older files).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ProfileState = Literal["queued", "running", "done", "failed"]
ACTIVE_STATES = ("queued", "running")
OutcomeKind = Literal["task", "likelihood"]
OUTCOME_KINDS: tuple[str, ...] = ("task", "likelihood")
LIKELIHOOD_DETAIL = "nll"   # a likelihood outcome's detail carries the reference's mean NLL


def data_outcome_kind(path: str | Path) -> OutcomeKind:
    """The outcome kind of a routing data file: ``likelihood`` when its first native JSONL row's
    ``detail`` gives every expert an ``nll``, else ``task`` (other formats, e.g. RouterBench CSV,
    hold task scores). Raises OSError when the file cannot be read."""
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                detail = json.loads(line).get("detail") or {}
            except (ValueError, AttributeError):
                return "task"
            likelihood = bool(detail) and all(LIKELIHOOD_DETAIL in (d or {}) for d in detail.values())
            return "likelihood" if likelihood else "task"
    return "task"


def fitted_outcome_kind(meta: dict, data_path: str | Path) -> OutcomeKind:
    """The outcome kind of a fitted router: ``outcome_kind`` in its router.json (``meta``), which
    ``coe router fit`` records; inferred from its data file for older files. Raises ValueError for
    a recorded kind that is not one of :data:`OUTCOME_KINDS`."""
    kind = meta.get("outcome_kind")
    if kind is None:
        return data_outcome_kind(data_path)
    if kind not in OUTCOME_KINDS:
        raise ValueError(f"outcome_kind is {kind!r}; allowed: {', '.join(OUTCOME_KINDS)}")
    return kind


def query_key(query: str) -> str:
    """The key an outcome is stored under: sha256 of the query text (the router's row identity)."""
    return hashlib.sha256(query.encode("utf-8")).hexdigest()


class ProfileOutcome(BaseModel):
    """One measured outcome of ``expert`` on one probe query, on the fitted router's scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    expert: str
    probe_id: str
    query: str
    category: str | None = None
    kind: OutcomeKind = Field(description="task (0/1 by the probe's scorer) or likelihood; outcomes stored before "
                                          "kinds existed read as likelihood when their detail has nll, else task")
    outcome: float = Field(description="quality on the router data's scale (task: 0/1; likelihood: exp(-mean NLL))")
    cost: float = Field(description="measured tokens x the expert's configured cost")
    detail: dict[str, Any] = Field(default_factory=dict, description="e.g. nll, tokens, reason")
    profiled_by: str = Field(description="the expert whose profile job measured it")

    @model_validator(mode="before")
    @classmethod
    def _infer_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" not in data:
            nll = LIKELIHOOD_DETAIL in (data.get("detail") or {})
            data = {**data, "kind": "likelihood" if nll else "task"}
        return data

    @property
    def key(self) -> str:
        return query_key(self.query)


class AbilityEstimate(BaseModel):
    """The new expert's ability on the probe set's IRT scale (:class:`coe.routers.probe_selection.ItemBank`):
    the posterior mean ``theta``, its standard error ``se`` and the outcomes it rests on."""

    model_config = ConfigDict(extra="forbid")

    theta: float
    se: float
    answered: int


class RefitReport(BaseModel):
    """How the router was refitted after a profile: its params, and whether cross-validation chose them."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(description="the router's params after the refit")
    selected_by: Literal["cv", "kept"] = Field(description="cv: best mean held-out AIQ over the router's grid (as "
                                                           "`coe eval` selects); kept: the fitted router's own params")
    cv_aiq: float | None = Field(None, description="the chosen params' mean held-out AIQ (cv only)")
    scored: int = Field(0, description="grid combinations scored")
    grid: int = Field(0, description="grid combinations in all")
    seconds: float = Field(0.0, description="time spent cross-validating")
    note: str | None = Field(None, description="why the params were kept (over serving.refit_budget_s, too few rows)")


class ProfileJob(BaseModel):
    """Where one expert's profile stands (the ``profile`` field of an expert in the admin API)."""

    model_config = ConfigDict(extra="forbid")

    expert: str
    state: ProfileState = "queued"
    probe: str = Field(description="the probe set: a built-in name or a file")
    kind: OutcomeKind = Field("likelihood", description="the outcome kind measured: task (each probe's scorer) or "
                                                        "likelihood (jobs stored before kinds existed: likelihood)")
    budget: int = Field(description="probe queries asked for")
    done: int = Field(0, description="requests finished (measured or failed)")
    total: int = Field(0, description="requests in the job: the budget, plus fitted experts measured on "
                                      "probes their data lacks")
    failed: int = Field(0, description="requests that gave no outcome")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float | None = Field(None, description="last progress (a heartbeat while running)")
    error: str | None = Field(None, description="why the job failed, or the first failed request's reason")
    strategy: str = Field("round_robin", description="how the probes were chosen: adaptive, round_robin or random "
                                                     "(adaptive falls back to round_robin, saying so in note)")
    stop_se: float | None = Field(None, description="stop_when.se: stop once the ability's standard error is at most this")
    probes_done: int = Field(0, description="probes the expert was measured on so far (at most the budget)")
    phase: Literal["measuring", "refitting"] | None = Field(None, description="what an active job is doing")
    ability: AbilityEstimate | None = Field(None, description="the expert's ability estimate so far (None without the "
                                                              "fitted experts' outcomes on the probes)")
    note: str | None = Field(None, description="e.g. why adaptive fell back to round_robin, or why the job stopped early")
    refit: RefitReport | None = Field(None, description="the refit that ended the job")

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES
