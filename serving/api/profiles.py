"""Runtime profiles: measure a newly registered expert on probe queries, in the background, and
refit the served router on its outcomes so it wins the queries it is measurably best at.

``POST /v1/experts`` with ``profile: {probe, budget}`` (or ``POST /v1/experts/{id}/profile``)
answers at once; :class:`ProfileJobs` then sends ``budget`` probes to the expert as scoring
requests (:mod:`coe.likelihood_profile`: the reference answer's likelihood from the engine's
prompt log-probabilities, the scale of the shipped fitted data), through the ingress's own
admission control and backend, at most ``serving.profile_concurrency`` at a time, so other
traffic keeps flowing. Then it stores the outcomes in the registry (``profile_outcomes``) and
refits the fitted router on its data plus every stored profile (:mod:`coe.routers.profile_data`).

Which probes: the first ``budget`` probes that carry a reference, taken round-robin over the
probe set's categories (so a small budget still covers every domain). A probe that is not in the
fitted router's data (another probe set) has no outcome of the fitted experts to compare with,
and likelihoods of different references are not comparable; so the job measures the fitted
experts on it too (``total`` counts those requests). A request that fails is counted with its
reason and the job goes on; the job fails when the expert got no outcome, when it is removed,
or when the refit fails. A failed job leaves the router as it was: the expert stays routed by
its description. Progress (``queued``/``running``/``done``/``failed``, done/total, times, the
error) is stored in the registry (``profile_jobs``), so every replica shows it; a job whose
replica stopped (no heartbeat for :attr:`ProfileJobs.stale_after_s`) reads as failed and may be
restarted. Runs on the ingress's event loop; the refit runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coe.config import LoraExpert, ModelExpert
from coe.errors import (
    CoEError,
    ConfigError,
    ExpertNotFoundError,
    InvalidRequestError,
    OverloadedError,
    ProfileRunningError,
    available,
)
from coe.profile_records import ProfileJob, ProfileOutcome

log = logging.getLogger("coe.serving")
BUILTIN_PROBES = "probes"   # folder of coe.configs holding the built-in probe sets (name = file stem)


class ProfileRequest(BaseModel):
    """The ``profile`` field of a registration (and the body of ``POST /v1/experts/{id}/profile``)."""

    model_config = ConfigDict(extra="forbid")

    probe: str = Field(min_length=1, description="A built-in probe set (`default`: the probes the shipped router "
                                                 "was fitted on) or a probe file under serving.probe_roots.")
    budget: int = Field(ge=1, description="How many probes to measure the expert on (at most the set's size).")


def builtin_probe_sets() -> dict[str, Path]:
    from importlib.resources import files

    folder = Path(str(files("coe.configs") / BUILTIN_PROBES))
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))}


def parse_profile(data) -> ProfileRequest:
    """Validate a ``profile`` body: 400 naming the field (``profile.budget``...)."""
    from coe.serving.api.validation import check_text

    if not isinstance(data, dict):
        raise InvalidRequestError("profile must be an object {probe, budget}", param="profile")
    check_text(data, "profile", allow_nul=False)
    try:
        return ProfileRequest.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(x) for x in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        raise InvalidRequestError(f"profile.{field}: {msg} (fields: probe, budget)", param=f"profile.{field}") from None


def choose_probes(probes: list, budget: int) -> list:
    """The first ``budget`` probes with a reference, round-robin over categories in file order."""
    by_cat: dict[str, list] = {}
    for p in probes:
        if (p.reference or "").strip():
            by_cat.setdefault(p.category or "", []).append(p)
    queues = list(by_cat.values())
    out: list = []
    while len(out) < budget and any(queues):
        for q in queues:
            if q and len(out) < budget:
                out.append(q.pop(0))
    return out


class ProfileJobs:
    """The profiles of one ingress replica (see the module docstring). ``concurrency`` defaults
    to ``serving.profile_concurrency``."""

    retries = 20             # an overloaded expert (429) is retried, not failed
    heartbeat_s = 5.0

    def __init__(self, service, *, concurrency: int | None = None) -> None:
        self.service = service
        s = service.config.serving
        self.concurrency = concurrency or s.profile_concurrency
        self.stale_after_s = 2 * s.request_timeout_s + 60
        self._gate: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._jobs: dict[str, ProfileJob] = {}           # this replica's jobs (and all of them without a registry)
        self._outcomes: list[ProfileOutcome] = []        # without a registry only
        self._data = None
        self._tokenizers: dict[str, object] = {}
        if self._stored_outcomes():
            try:
                self.refit()
            except Exception:
                log.exception("could not rebuild the router from the stored profiles")

    # ------------------------------------------------------------------ reading

    @property
    def registry(self):
        return self.service.catalog.registry

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
                self._data = ProfiledData(folder, router.embedder.encode)
            except ConfigError as err:
                raise InvalidRequestError(f"profile: {err.message}", param="profile") from None
        return self._data

    # ------------------------------------------------------------------ starting

    def prepare(self, expert, body) -> tuple[ProfileRequest, list]:
        """Check a profile request for ``expert`` (a config object, registered or not yet) before
        anything starts: 400 naming the field. Returns the request and the chosen probes."""
        from coe.profiling import check_probe_file

        req = parse_profile(body)
        if not isinstance(expert, (ModelExpert, LoraExpert)):
            raise InvalidRequestError(f"only model and LoRA experts can be profiled; {expert.id!r} is a {expert.kind}",
                                      param="profile")
        data = self.data()
        if expert.id in data.experts:
            raise InvalidRequestError(f"expert {expert.id!r} is in the fitted router's data already; refit with "
                                      "`coe router fit` to change its outcomes", param="profile")
        if not data.is_likelihood():
            raise InvalidRequestError(f"the fitted router's data {data.path} does not hold reference likelihoods "
                                      "(detail.nll); runtime profiles measure likelihood only", param="profile")
        path = self._probe_path(req.probe)
        try:
            probes = check_probe_file(path)
        except CoEError as err:   # DatasetError naming the line, or an empty file
            raise InvalidRequestError(f"profile.probe: {err.message}", param="profile.probe") from None
        usable = sum(1 for p in probes if (p.reference or "").strip())
        if req.budget > usable:
            raise InvalidRequestError(f"profile.budget is {req.budget}, but {req.probe} has {usable} probes with a "
                                      f"reference answer; allowed: 1 to {usable}", param="profile.budget")
        return req, choose_probes(probes, req.budget)

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
        known = data.queries()
        foreign = [p for p in probes if p.query not in known]
        others = [e for e in data.experts if isinstance(self.service.catalog.get(e), (ModelExpert, LoraExpert))]
        now = time.time()
        job = ProfileJob(expert=expert_id, probe=req.probe, budget=req.budget, total=len(probes) + len(foreign) * len(others),
                         created_at=now, updated_at=now)
        if self.registry is not None:
            self.registry.start_profile_job(job, stale_before=now - self.stale_after_s)
        self._jobs[expert_id] = job
        work = [(p, expert_id) for p in probes] + [(p, e) for p in foreign for e in others]
        self._tasks[expert_id] = asyncio.get_running_loop().create_task(self._run(job, work))
        log.info("profiling expert %s on %d probe(s) of %s (%d request(s))", expert_id, len(probes), req.probe, job.total)
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

    async def _run(self, job: ProfileJob, work: list) -> None:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        outcomes: list[ProfileOutcome] = []

        async def one(probe, eid):
            async with self._gate:
                if job.state == "queued":
                    self._save(job, state="running", started_at=time.time())
                try:
                    outcomes.append(await self._measure(eid, probe, job.expert))
                except CoEError as err:
                    job.failed += 1
                    job.error = job.error or f"{eid} on {probe.id}: {err.message}"
                    log.warning("profile %s: %s on %s failed: %s", job.expert, eid, probe.id, err.message)
                self._save(job, done=job.done + 1)

        try:
            await asyncio.gather(*(one(p, e) for p, e in work))
            mine = [o for o in outcomes if o.expert == job.expert]
            if not mine:
                raise InvalidRequestError(f"no probe could be scored ({job.error or 'no probes'})")
            if job.expert not in self.service.catalog:
                raise ExpertNotFoundError(f"expert {job.expert!r} was removed during its profile")
            if self.registry is not None:
                self.registry.put_profile_outcomes(outcomes)
            else:
                self._outcomes += outcomes
            await asyncio.to_thread(self.refit)
            self._save(job, state="done", finished_at=time.time())
            log.info("profile of %s done: %d outcome(s), %d failed request(s)", job.expert, len(mine), job.failed)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001  (any failure ends the job, never the service)
            why = err.message if isinstance(err, CoEError) else f"{type(err).__name__}: {err}"
            log.warning("profile of %s failed: %s", job.expert, why)
            self._save(job, state="failed", finished_at=time.time(), error=why)
        finally:
            if self._tasks.get(job.expert) is asyncio.current_task():
                self._tasks.pop(job.expert, None)

    async def _measure(self, expert_id: str, probe, profiled_by: str) -> ProfileOutcome:
        """One scoring request through admission control and the backend (no fallback: the
        measurement must be of this expert)."""
        from coe.likelihood_profile import (
            SCORING_SAMPLING,
            ScoringError,
            answer_nll,
            likelihood_cell,
            scoring_prompt,
        )
        from coe.serving.api.admission import Deadline
        from coe.serving.deployments.spec import server_id_of
        from coe.types import GenerationRequest, SamplingParams

        service = self.service
        expert = service.catalog.get(expert_id)
        if expert is None:
            raise ExpertNotFoundError(f"expert {expert_id!r} was removed")
        tok = await self._tokenizer(expert)
        sp = scoring_prompt(tok, probe.query, probe.reference)
        lora = isinstance(expert, LoraExpert)
        request = GenerationRequest(
            request_id=f"profile-{uuid.uuid4().hex[:16]}", prompt_token_ids=list(sp.token_ids),
            sampling=SamplingParams(**SCORING_SAMPLING), adapter=expert_id if lora else None, expert=expert_id,
        )
        deadline = Deadline(service.config.serving.request_timeout_s)
        for attempt in range(self.retries):
            try:
                await service.admission.acquire(expert_id, deadline)
                break
            except OverloadedError:
                if attempt == self.retries - 1:
                    raise
                await asyncio.sleep(min(self.heartbeat_s, max(0.05, deadline.left() / self.retries)))
        try:
            served = await deadline.run(service.backend.generate(server_id_of(expert), request,
                                                                 expert.adapter if lora else None))
        except CoEError:
            raise
        except Exception as raw:  # noqa: BLE001  (a transport error counts as a failed request)
            from coe.serving.api.errors import as_coe_error

            raise as_coe_error(raw) or InvalidRequestError(f"{type(raw).__name__}: {raw}") from None
        finally:
            service.admission.release(expert_id)
        try:
            nll = answer_nll(served.output.prompt_logprobs, sp)
        except ScoringError as err:
            raise InvalidRequestError(str(err)) from None
        outcome, cost, detail = likelihood_cell(nll, sp.answer_tokens, float(expert.cost))
        return ProfileOutcome(expert=expert_id, probe_id=probe.id, query=probe.query, category=probe.category,
                              outcome=outcome, cost=cost, detail=detail, profiled_by=profiled_by)

    async def _tokenizer(self, expert):
        """The tokenizer of the expert's model (a LoRA's base), loaded once: the ingress renders
        nothing with it, it only knows which tokens the engine must score."""
        from coe.serving.deployments.spec import resolve_model
        from coe.serving.engines.tokens import load_tokenizer

        host = self.service.catalog.get(expert.base) if isinstance(expert, LoraExpert) else expert
        if host is None:
            raise ExpertNotFoundError(f"the base of {expert.id!r} was removed")
        ref = resolve_model(host.model, self.service.base_dir)
        if ref not in self._tokenizers:
            self._tokenizers[ref] = await asyncio.to_thread(load_tokenizer, ref)
        return self._tokenizers[ref]

    # ------------------------------------------------------------------ the router

    def refit(self) -> None:
        """Refit the served router on the fitted data plus every stored profile of a live expert
        (blocking: call in a worker thread while serving)."""
        data = self.data()
        live = set(self.service.catalog.ids())
        from coe.routers.base import FitContext

        experts = self.service.catalog.snapshot().values()
        ctx = FitContext(descriptions={e.id: [e.description, *e.examples] for e in experts},
                         skills={e.id: list(e.skills) for e in experts},
                         categories={e.id: e.category for e in experts if e.category}, embed=data.embed)
        router = data.refit(self._stored_outcomes(), live, ctx)
        self.service.router.replace_fitted(router)

    async def refresh(self) -> None:
        """Refit after the stored outcomes changed (an expert removed, here or on another replica)."""
        if self._data is None and not self._stored_outcomes():
            return
        try:
            await asyncio.to_thread(self.refit)
        except Exception:
            log.exception("could not refit the router on the stored profiles")
