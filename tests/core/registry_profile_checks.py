"""One check of the registry's profile tables, run on SQLite and on PostgreSQL."""

from __future__ import annotations

import time

import pytest

from coe.config import LoraExpert
from coe.errors import ProfileRunningError
from coe.profile_records import AbilityEstimate, ProfileJob, ProfileOutcome, RefitReport

NEW = LoraExpert(id="new", base="base", adapter="/a/new", description="new")


def outcome(expert: str, query: str, value: float, by: str = "new") -> ProfileOutcome:
    return ProfileOutcome(expert=expert, probe_id=query, query=query, category="math", outcome=value,
                          cost=10.0, detail={"nll": 0.1, "tokens": 10}, profiled_by=by)


def check_profiles_persist_and_go_with_the_expert(make_registry) -> None:
    reg = make_registry()
    reg.add(NEW)
    rev = reg.revision()
    now = time.time()
    job = ProfileJob(expert="new", probe="default", budget=2, total=2, created_at=now, updated_at=now)
    reg.start_profile_job(job, stale_before=now - 60)
    with pytest.raises(ProfileRunningError, match="still queued"):
        reg.start_profile_job(job, stale_before=now - 60)
    reg.start_profile_job(job, stale_before=now + 1)   # a stalled job may be replaced
    job.state, job.done = "running", 1
    reg.save_profile_job(job)
    reg.put_profile_outcomes([outcome("new", "q1", 0.5), outcome("new", "q2", 0.7), outcome("base", "q2", 0.2)])
    reg.put_profile_outcomes([outcome("new", "q1", 0.6)])      # a re-measurement replaces the old one
    assert reg.revision() == rev + 2                          # other replicas rebuild their router

    again = make_registry()                                   # a restart, or another replica
    got = {(o.expert, o.query): o.outcome for o in again.profile_outcomes()}
    assert got == {("new", "q1"): 0.6, ("new", "q2"): 0.7, ("base", "q2"): 0.2}
    assert again.profile_jobs()["new"].state == "running" and again.profile_jobs()["new"].done == 1

    # a job's end: its outcomes and its 'done' in one transaction (the ability, strategy and refit kept)
    job.state, job.done, job.probes_done, job.strategy = "done", 2, 2, "adaptive"
    job.ability = AbilityEstimate(theta=0.5, se=0.4, answered=2)
    job.refit = RefitReport(params={"k": 10}, selected_by="cv", cv_aiq=0.1, scored=16, grid=16)
    reg.put_profile_outcomes([outcome("new", "q3", 0.9)], job)
    stored = again.profile_jobs()["new"]
    assert stored.state == "done" and stored.ability.se == 0.4 and stored.refit.params == {"k": 10}
    assert ("new", "q3") in {(o.expert, o.query) for o in again.profile_outcomes()}
    assert reg.revision() == rev + 3

    again.remove("new")                                       # its job and its outcomes go with it
    assert [(o.expert, o.query) for o in reg.profile_outcomes()] == [("base", "q2")]
    assert reg.profile_jobs() == {}
