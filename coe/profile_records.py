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

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES
