"""The rows of a runtime profile: one measured outcome, and the state of one profile job.

A profile measures one expert on probe queries (``POST /v1/experts`` with ``profile:``, or
``POST /v1/experts/{id}/profile``). Both row types are stored by the expert registry
(:mod:`coe.registry`, tables ``profile_outcomes`` and ``profile_jobs``), shown by the admin API
(``ProfileJob`` is the ``profile`` field of ``GET /v1/experts/{id}``) and read back to rebuild
the fitted router, so every ingress replica and every restart sees the same profile.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ProfileState = Literal["queued", "running", "done", "failed"]
ACTIVE_STATES = ("queued", "running")


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
    outcome: float = Field(description="quality on the router data's scale (likelihood: exp(-mean NLL))")
    cost: float = Field(description="measured tokens x the expert's configured cost")
    detail: dict[str, Any] = Field(default_factory=dict, description="e.g. nll, tokens")
    profiled_by: str = Field(description="the expert whose profile job measured it")

    @property
    def key(self) -> str:
        return query_key(self.query)


class ProfileJob(BaseModel):
    """Where one expert's profile stands (the ``profile`` field of an expert in the admin API)."""

    model_config = ConfigDict(extra="forbid")

    expert: str
    state: ProfileState = "queued"
    probe: str = Field(description="the probe set: a built-in name or a file")
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
