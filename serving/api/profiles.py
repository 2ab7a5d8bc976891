"""Runtime profiles: measure a newly registered expert on probe queries, in the background, and
refit the served router on its outcomes so it wins the queries it is measurably best at.

``POST /v1/experts`` with ``profile: {probe, budget, kind, max_tokens, strategy, stop_when}`` (or
``POST /v1/experts/{id}/profile``) answers at once; :class:`ProfileJobs` then asks the expert the
probes, keeping ``serving.profile_concurrency`` of them in flight: each time one ends, the strategy
picks the next from every outcome so far (:mod:`coe.serving.api.profile_plan`: ``round_robin`` by
default, ``random``, or ``adaptive``, which reads the fitted experts' outcomes on the same probes),
through the ingress's own admission control and backend (:mod:`coe.serving.api.profile_measure`,
which stops generating once an answer's score cannot change), so other traffic keeps flowing.
After each probe the job records the expert's ability estimate and its
standard error; ``stop_when: {se}`` ends the job early once the error is small enough.

The outcome kind (:mod:`coe.profile_records`) is the fitted router's data's (``outcome_kind`` in
its router.json, inferred for older files); a request for the other kind is refused (400), since a
router must not mix them. A probe that is not in the fitted router's data (another probe set)
has no outcome of the fitted experts to compare with, so the job measures the fitted experts on
it too (``total`` counts those requests). A request that fails is counted with its reason and the
job goes on (an answer that fails its scorer is an outcome of 0).

At the end the router is refitted, in a worker thread, on its data plus every stored profile of
the same kind, its params chosen by cross-validation within ``serving.refit_budget_s``
(:func:`coe.routers.profile_data.select_params`); then, with no await in between, the outcomes
and the job's ``done`` are stored in one transaction and the new router is installed. So a job
stopped midway (cancelled, its replica shut down or killed) stores no outcome: it reads
``failed`` (at once when it could say so, else once its heartbeat is older than
:attr:`ProfileJobs.stale_after_s`) and may be restarted. The job fails when the expert got no
outcome, when it is removed, or when the refit fails; a failed job leaves the router as it was
(the expert stays routed by its description). Progress is stored in the registry
(``profile_jobs``), so every replica shows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coe.config import LoraExpert, ModelExpert
from coe.errors import (
    CoEError,
    ConfigError,
    ExpertNotFoundError,
    InvalidRequestError,
    ProfileRunningError,
    available,
)
from coe.profile_records import (
    OutcomeKind,
    ProfileJob,
    ProfileOutcome,
    RefitReport,
    fitted_outcome_kind,
)
from coe.routers.probe_selection import STRATEGIES
from coe.serving.api.profile_measure import ProbeMeasurer
from coe.serving.api.profile_plan import MIN_STOP_PROBES, ProbePlan

log = logging.getLogger("coe.serving")
BUILTIN_PROBES = "probes"   # folder of coe.configs holding the built-in probe sets (name = file stem)
# The longest answer to a generated task probe, per scorer, unless the request gives max_tokens: how
# the shipped router's data (configs/profiles/default_tasks.jsonl) was measured, so a new expert's
# outcomes compare with the fitted experts' on the same probes. Every MBPP reference answer of the
# default probe set fits 256 SmolLM2 tokens (median 55, max 247) and the fitted experts' passing code
# answers used at most 256; their passing GSM8K answers used up to 452 (512 in the 200-probe eval).
DEFAULT_MAX_TOKENS = {"code_tests": 256, "exact_number": 512}


class StopWhen(BaseModel):
    """``profile.stop_when``: end the profile before its budget once the expert is measured well enough."""

    model_config = ConfigDict(extra="forbid")

    se: float = Field(gt=0, description="Stop once the standard error of the expert's ability estimate (IRT "
                                        "scale, see GET /v1/experts/{id} `profile.ability`) is at most this.")
    min_probes: int = Field(MIN_STOP_PROBES, ge=1, strict=True,
                            description="Outcomes needed before the rule applies.")


class ProfileRequest(BaseModel):
    """The ``profile`` field of a registration (and the body of ``POST /v1/experts/{id}/profile``)."""

    model_config = ConfigDict(extra="forbid")

    probe: str = Field(min_length=1, description="A built-in probe set (`default`: the probes the shipped router "
                                                 "was fitted on) or a probe file under serving.probe_roots.")
    budget: int = Field(ge=1, description="How many probes to measure the expert on (at most the set's size).")
    kind: OutcomeKind | None = Field(None, description="How a probe is scored: `task` (its own scorer: exact_number, "
                                     "code_tests in the sandbox, choice by option likelihood; outcome 0/1) or "
                                     "`likelihood` (exp(-mean NLL) of its reference). Default: the kind of the fitted "
                                     "router's data; the other kind is refused (a router must not mix them).")
    max_tokens: int | None = Field(None, ge=1, strict=True, description="Longest answer to a task probe (greedy), 1 "
                                   "to serving.max_tokens_limit. By default per scorer: 256 for code_tests, 512 for "
                                   "exact_number (as the shipped router's data was measured), or that limit if lower. "
                                   "Generation stops earlier once the answer's score cannot change (code_tests: the "
                                   "code block it runs is closed).")
    strategy: Literal[STRATEGIES] = Field(
        "round_robin", description="How each next probe is chosen: `round_robin` over the set's categories "
        "in file order; `random`; `adaptive`, anchor points: the probes that best cover the set, by query embedding "
        "and the fitted experts' outcomes on them; `information`, the most informative probes about the expert's "
        "ability under an IRT model of those outcomes. The last two fall back to round_robin, saying so, on probes "
        "the fitted experts have no outcomes on.")
    stop_when: StopWhen | None = Field(None, description="Stop early: `{se: x}` once the ability's standard error "
                                                         "is at most x.")


def max_tokens_for(probe, requested: int | None, limit: int) -> int:
    """The longest answer to ``probe``: ``requested``, else its scorer's default
    (:data:`DEFAULT_MAX_TOKENS`), at most ``limit`` (``serving.max_tokens_limit``)."""
    return min(requested or DEFAULT_MAX_TOKENS.get(probe.scorer, max(DEFAULT_MAX_TOKENS.values())), limit)


def builtin_probe_sets() -> dict[str, Path]:
    from importlib.resources import files

    folder = Path(str(files("coe.configs") / BUILTIN_PROBES))
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))}


def parse_profile(data) -> ProfileRequest:
    """Validate a ``profile`` body: 400 naming the field (``profile.budget``...)."""
    from coe.serving.api.validation import check_text

    if not isinstance(data, dict):
        raise InvalidRequestError("profile must be an object {probe, budget, ...}", param="profile")
    check_text(data, "profile", allow_nul=False)
    try:
        return ProfileRequest.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(x) for x in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        model = StopWhen if e["loc"][:1] == ("stop_when",) and len(e["loc"]) > 1 else ProfileRequest
        fields = ", ".join(model.model_fields)
        raise InvalidRequestError(f"profile.{field}: {msg} (fields: {fields})", param=f"profile.{field}") from None


def scorable(probe, kind: OutcomeKind) -> bool:
    """Whether a ``kind`` profile can score ``probe``: a task scorer (``task``), a reference (``likelihood``)."""
    from coe.scoring.cells import TASK_SCORERS

    return probe.scorer in TASK_SCORERS if kind == "task" else bool((probe.reference or "").strip())


def usable_probes(probes: list, kind: OutcomeKind) -> list:
    """The probes a ``kind`` profile can score, in file order."""
    return [p for p in probes if scorable(p, kind)]


class ProfileJobs:
    """The profiles of one ingress replica (see the module docstring). ``concurrency`` defaults
    to ``serving.profile_concurrency``."""

    def __init__(self, service, *, concurrency: int | None = None) -> None:
        self.service = service
        s = service.config.serving
        self.concurrency = concurrency or s.profile_concurrency
        self.refit_budget_s = s.refit_budget_s
        self.stale_after_s = 2 * s.request_timeout_s + 60 + s.refit_budget_s
        self.measurer = ProbeMeasurer(service)
        self._gate: asyncio.Semaphore | None = None
        self._refit_lock = asyncio.Lock()   # one refit at a time on this replica (a job's, or a refresh)
        self._tasks: dict[str, asyncio.Task] = {}
        self._jobs: dict[str, ProfileJob] = {}           # this replica's jobs (and all of them without a registry)
        self._outcomes: list[ProfileOutcome] = []        # without a registry only
        self._data = None
        self._kind: OutcomeKind | None = None
        if self._stored_outcomes():
            try:
                self.refit()
            except Exception:
                log.exception("could not rebuild the router from the stored profiles")

    # ------------------------------------------------------------------ reading

    @property
    def registry(self):
        return self.service.catalog.registry

    @property
    def scorer_options(self) -> dict[str, dict]:
        """Scorer name -> options for this replica's task profiles, e.g. code_tests' ``timeout_s``."""
        return self.measurer.scorer_options

    @scorer_options.setter
    def scorer_options(self, options: dict[str, dict]) -> None:
        self.measurer.scorer_options = dict(options)

    def status(self, expert_id: str) -> ProfileJob | None:
        return self.statuses().get(expert_id)

    def statuses(self) -> dict[str, ProfileJob]:
        """The latest profile job of every expert that has one (a stalled one reads as failed)."""
        jobs: dict[str, ProfileJob] = {}
        if self.registry is not None:
            try:
                jobs = dict(self.registry.profile_jobs())
            except CoEError:   # a registry outage: show this replica's jobs, keep listing experts
                pass
        jobs.update(self._jobs)
        now = time.time()
        for eid, job in jobs.items():
            if job.active and eid not in self._tasks and now - (job.updated_at or job.created_at) > self.stale_after_s:
                jobs[eid] = job.model_copy(update={
                    "state": "failed", "error": f"no progress for {self.stale_after_s:g} s: the replica running it "
                                                f"stopped; restart it with POST /v1/experts/{eid}/profile"})
        return jobs

    def _stored_outcomes(self) -> list[ProfileOutcome]:
        return self.registry.profile_outcomes() if self.registry is not None else list(self._outcomes)

    def data(self):
        """The fitted router's data (:class:`coe.routers.profile_data.ProfiledData`), loaded once;
        InvalidRequestError when there is no usable one."""
        if self._data is None:
            from coe.routers.profile_data import ProfiledData, fitted_folder

            cfg = self.service.config.router
            folder = fitted_folder(cfg, self.service.base_dir)
            router = self.service.router
            if folder is None or getattr(router, "fitted", None) is None:
                raise InvalidRequestError("profiles feed the fitted router, and this service has none (router.fitted "
                                          "is not set); fit one with `coe router fit`", param="profile")
            try:
                data = ProfiledData(folder, router.embedder.encode)
                self._kind = fitted_outcome_kind(data.meta, data.path)
            except ConfigError as err:
                raise InvalidRequestError(f"profile: {err.message}", param="profile") from None
            except (OSError, ValueError) as err:
                raise InvalidRequestError(f"profile: the outcome kind of fitted router {folder}: {err}",
                                          param="profile") from None
            self._data = data
        return self._data

    def data_kind(self) -> OutcomeKind:
        """The outcome kind of the fitted router's data (InvalidRequestError as :meth:`data`)."""
        self.data()
        return self._kind

    # ------------------------------------------------------------------ starting

    def prepare(self, expert, body) -> tuple[ProfileRequest, list]:
        """Check a profile request for ``expert`` (a config object, registered or not yet) before
        anything starts: 400 naming the field. Returns the request (``kind`` resolved) and the
        chosen probes."""
        from coe.scoring.probes import check_probe_file

        req = parse_profile(body)
        if not isinstance(expert, (ModelExpert, LoraExpert)):
            raise InvalidRequestError(f"only model and LoRA experts can be profiled; {expert.id!r} is a {expert.kind}",
                                      param="profile")
        data = self.data()
        if expert.id in data.experts:
            raise InvalidRequestError(f"expert {expert.id!r} is in the fitted router's data already; refit with "
                                      "`coe router fit` to change its outcomes", param="profile")
        fitted = self.data_kind()
        kind = req.kind or fitted
        if kind != fitted:
            raise InvalidRequestError(
                f"profile.kind is {kind!r}, but the fitted router's data {data.path} holds {fitted!r} outcomes, and a "
                f"router must not mix them; profile with kind {fitted!r}, or refit the router on {kind} outcomes "
                "(`coe router fit`)", param="profile.kind")
        limit = self.service.config.serving.max_tokens_limit
        if req.max_tokens is not None and req.max_tokens > limit:
            raise InvalidRequestError(f"profile.max_tokens is {req.max_tokens}; allowed: 1 to {limit} "
                                      "(serving.max_tokens_limit)", param="profile.max_tokens")
        path = self._probe_path(req.probe)
        try:   # every probe is validated: a code_tests probe without tests is refused here, naming 'tests'
            probes = check_probe_file(path)
        except CoEError as err:   # DatasetError naming the line, or an empty file
            raise InvalidRequestError(f"profile.probe: {err.message}", param="profile.probe") from None
        candidates = usable_probes(probes, kind)
        usable = len(candidates)
        what = ("a task scorer (exact_number, code_tests, choice)" if kind == "task" else "a reference answer")
        if not usable:   # e.g. a set of reference answers only, for a router fitted on task outcomes
            other = "likelihood" if kind == "task" else "task"
            suits = (f"its {n} probes suit a {other} profile: " if (n := len(usable_probes(probes, other))) else "")
            raise InvalidRequestError(
                f"profile.probe: {req.probe} has no probe with {what}, which a {kind} profile needs (the fitted "
                f"router's data holds {fitted!r} outcomes); {suits}give probes with {what}, or refit the router on "
                f"{other} outcomes (`coe router fit`)", param="profile.probe")
        if req.budget > usable:
            raise InvalidRequestError(f"profile.budget is {req.budget}, but {req.probe} has {usable} probes with "
                                      f"{what}; allowed: 1 to {usable}", param="profile.budget")
        req = req.model_copy(update={"kind": kind})
        return req, candidates

    def _probe_path(self, probe: str) -> Path:
        from coe.serving.deployments.spec import resolve_path

        builtin = builtin_probe_sets()
        if probe in builtin:
            return builtin[probe]
        base = self.service.base_dir
        path = resolve_path(probe, base)
        roots = [resolve_path(r, base) for r in self.service.config.serving.probe_roots]
        if not any(path == r or r in path.parents for r in roots):
            raise InvalidRequestError(
                f"profile.probe {probe!r} is neither a built-in probe set ({available(builtin)}) nor a file under "
                f"serving.probe_roots ({available(str(r) for r in roots)})", param="profile.probe")
        if not path.is_file():
            raise InvalidRequestError(f"profile.probe: {path} is not a file", param="profile.probe")
        return path

    def start(self, expert_id: str, req: ProfileRequest, probes: list) -> ProfileJob:
        """Record and launch a job (call on the event loop). 404 for an unknown expert, 409 while
        its previous profile is active."""
        if expert_id not in self.service.catalog:
            raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(self.service.catalog.ids())}")
        current = self.status(expert_id)
        if current is not None and current.active:
            raise ProfileRunningError(f"a profile of expert {expert_id!r} is still {current.state} "
                                      f"({current.done}/{current.total}); wait for it to finish")
        data = self.data()
        stop = req.stop_when
        plan = ProbePlan(probes, req.strategy, req.budget, data.base, stop_se=stop.se if stop else None,
                         min_probes=stop.min_probes if stop else MIN_STOP_PROBES)
        known = data.queries()
        others = [e for e in data.experts if isinstance(self.service.catalog.get(e), (ModelExpert, LoraExpert))]
        foreign = sum(1 for p in plan.planned() if p.query not in known)
        now = time.time()
        job = ProfileJob(expert=expert_id, probe=req.probe, kind=req.kind, budget=plan.budget,
                         total=plan.budget + foreign * len(others), created_at=now, updated_at=now,
                         strategy=plan.strategy, stop_se=plan.stop_se, note=plan.note)
        if self.registry is not None:
            self.registry.start_profile_job(job, stale_before=now - self.stale_after_s)
        self._jobs[expert_id] = job
        self._tasks[expert_id] = asyncio.get_running_loop().create_task(self._run(job, plan, req, others))
        log.info("profiling expert %s on up to %d probe(s) of %s by %s, %s (%d request(s))%s", expert_id, plan.budget,
                 req.probe, req.kind, plan.strategy, job.total, f": {plan.note}" if plan.note else "")
        return job

    async def cancel(self, expert_id: str) -> None:
        """Stop this replica's job of ``expert_id`` (the expert is being removed)."""
        task = self._tasks.pop(expert_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._jobs.pop(expert_id, None)
        self._outcomes = [o for o in self._outcomes if o.expert != expert_id]

    async def close(self) -> None:
        for eid in list(self._tasks):
            await self.cancel(eid)

    # ------------------------------------------------------------------ running

    def _save(self, job: ProfileJob, **update) -> None:
        for k, v in {**update, "updated_at": time.time()}.items():
            setattr(job, k, v)
        if self.registry is not None:
            try:
                self.registry.save_profile_job(job)
            except CoEError as err:   # progress is best effort; the outcomes are what matters
                log.warning("could not record the progress of profile %s: %s", job.expert, err.message)

    async def _run(self, job: ProfileJob, plan: ProbePlan, req: ProfileRequest, others: list[str]) -> None:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        outcomes: list[ProfileOutcome] = []
        known = self.data().queries()

        async def one(index, probe, eid):
            async with self._gate:
                if job.state == "queued":
                    self._save(job, state="running", phase="measuring", started_at=time.time())
                got = None
                try:
                    got = await self.measurer.measure(eid, probe, job.expert, req.kind,
                                                      max_tokens_for(probe, req.max_tokens, limit))
                    outcomes.append(got)
                except CoEError as err:
                    job.failed += 1
                    job.error = job.error or f"{eid} on {probe.id}: {err.message}"
                    log.warning("profile %s: %s on %s failed: %s", job.expert, eid, probe.id, err.message)
                if eid == job.expert:
                    plan.record(index, got.outcome if got is not None else None)
                    job.probes_done += 1
                self._save(job, done=job.done + 1, ability=plan.ability())

        async def probe(index, p):   # the new expert on one probe (and the fitted experts, on a foreign one)
            eids = [job.expert, *(others if p.query not in known else [])]
            await asyncio.gather(*(one(index, p, e) for e in eids))

        limit = self.service.config.serving.max_tokens_limit
        flying: set[asyncio.Task] = set()
        try:
            data = self.data()   # the item bank (the fitted data's embeddings, an L-BFGS fit): off the event loop
            await asyncio.to_thread(lambda: plan.fit(data.base_embeddings() if plan.strategy == "adaptive" else None))
            if plan.note != job.note:
                self._save(job, strategy=plan.strategy, note=plan.note)
            # a sliding window: `concurrency` probes in flight; as each ends, the plan picks the next
            # from every outcome so far (no wave waits for its slowest probe)
            while True:
                while len(flying) < self.concurrency and (nxt := plan.next_probe()) is not None:
                    flying.add(asyncio.get_running_loop().create_task(probe(*nxt)))
                if not flying:
                    break
                ended, flying = await asyncio.wait(flying, return_when=asyncio.FIRST_COMPLETED)
                for task in ended:
                    task.result()   # an unexpected error fails the job (a failed request does not)
            if plan.stopped:
                note = f"{job.note}; {plan.stopped}" if job.note else plan.stopped
                self._save(job, total=job.done, note=note)
            mine = [o for o in outcomes if o.expert == job.expert]
            if not mine:
                raise InvalidRequestError(f"no probe could be scored ({job.error or 'no probes'})")
            self._save(job, phase="refitting")
            async with self._refit_lock:   # one refit at a time: each sees the outcomes the previous stored
                router = await asyncio.to_thread(self._refitted, outcomes)
                # from here to the end no await: the outcomes, the job's end and the router go together
                if job.expert not in self.service.catalog:
                    raise ExpertNotFoundError(f"expert {job.expert!r} was removed during its profile")
                report = router.notes.get("profiled", {}).get("refit")
                end = {"state": "done", "phase": None, "finished_at": time.time(), "updated_at": time.time(),
                       "refit": RefitReport(**report) if report else None}
                for k, v in end.items():
                    setattr(job, k, v)
                if self.registry is not None:
                    self.registry.put_profile_outcomes(outcomes, job)
                else:
                    self._outcomes += outcomes
                self.service.router.replace_fitted(router)
            log.info("profile of %s done: %d outcome(s), %d failed request(s); router params %s", job.expert,
                     len(mine), job.failed, "kept" if not report else f"{report['selected_by']} {report['params']}")
        except asyncio.CancelledError:
            self._save(job, state="failed", phase=None, finished_at=time.time(),
                       error="the profile was stopped midway (its replica shut down, or it was cancelled); no outcome "
                             f"was stored; restart it with POST /v1/experts/{job.expert}/profile")
            raise
        except Exception as err:  # noqa: BLE001  (any failure ends the job, never the service)
            why = err.message if isinstance(err, CoEError) else f"{type(err).__name__}: {err}"
            log.warning("profile of %s failed: %s", job.expert, why)
            self._save(job, state="failed", phase=None, finished_at=time.time(), error=why)
        finally:
            for task in flying:   # cancelled or failed midway: stop its requests too
                task.cancel()
            if flying:
                await asyncio.gather(*flying, return_exceptions=True)
            if self._tasks.get(job.expert) is asyncio.current_task():
                self._tasks.pop(job.expert, None)

    # ------------------------------------------------------------------ the router

    def _usable_outcomes(self) -> list[ProfileOutcome]:
        """The stored outcomes of the fitted data's kind; others (measured before the router was
        refitted on another kind) are left out, never mixed in."""
        kind, stored = self.data_kind(), self._stored_outcomes()
        usable = [o for o in stored if o.kind == kind]
        if len(usable) < len(stored):
            experts = sorted({o.expert for o in stored if o.kind != kind})
            log.warning("left out %d stored profile outcome(s) of %s: not %s outcomes like the fitted router's data; "
                        "profile them again", len(stored) - len(usable), ", ".join(experts), kind)
        return usable

    def _refitted(self, extra: list[ProfileOutcome] = ()):
        """The served router refitted on the fitted data plus every stored profile of a live expert
        and of the data's outcome kind, plus ``extra`` (not yet stored), its params chosen by CV
        within ``serving.refit_budget_s``. Blocking: call in a worker thread while serving."""
        from coe.routers.base import FitContext

        data = self.data()
        live = set(self.service.catalog.ids())
        experts = self.service.catalog.snapshot().values()
        ctx = FitContext(descriptions={e.id: [e.description, *e.examples] for e in experts},
                         skills={e.id: list(e.skills) for e in experts},
                         categories={e.id: e.category for e in experts if e.category}, embed=data.embed)
        return data.refit([*self._usable_outcomes(), *extra], live, ctx, budget_s=self.refit_budget_s)

    def refit(self) -> None:
        """Refit the served router on the stored profiles (see :meth:`_refitted`) and install it
        (blocking: call in a worker thread while serving)."""
        self.service.router.replace_fitted(self._refitted())

    async def refresh(self) -> None:
        """Refit after the stored outcomes changed (an expert removed, here or on another replica)."""
        if self._data is None and not self._stored_outcomes():
            return
        try:
            async with self._refit_lock:   # never installs a router older than a job's that ends meanwhile
                await asyncio.to_thread(self.refit)
        except Exception:
            log.exception("could not refit the router on the stored profiles")
