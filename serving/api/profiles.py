"""Runtime profiles: measure a newly registered expert on probe queries, in the background, and
refit the served router on its outcomes so it wins the queries it is measurably best at.

``POST /v1/experts`` with ``profile: {probe, budget, kind, max_tokens}`` (or ``POST
/v1/experts/{id}/profile``) answers at once; :class:`ProfileJobs` then measures the expert on
``budget`` probes through the ingress's own admission control and backend, at most
``serving.profile_concurrency`` at a time, so other traffic keeps flowing. Then it stores the
outcomes in the registry (``profile_outcomes``) and refits the fitted router on its data plus
every stored profile of the same outcome kind (:mod:`coe.routers.profile_data`).

The outcome kind (:mod:`coe.profile_records`) is the fitted router's data's (``outcome_kind`` in
its router.json, inferred for older files); a request for the other kind is refused (400), since a
router must not mix them:

- ``task``: a pinned greedy chat request (``max_tokens``), the answer scored by the probe's own
  scorer, as ``coe experts profile`` does (:func:`coe.profiling.task_cell`): ``exact_number``,
  ``code_tests`` (in the sandbox of :mod:`coe.eval.sandbox`, never in this process), ``choice``
  (each option's likelihood by a scoring request, no generation); outcome 0/1. Scoring runs in a
  worker thread, so the event loop keeps answering.
- ``likelihood``: a scoring request (:mod:`coe.likelihood_profile`: the reference answer's
  ``exp(-mean NLL)`` from the engine's prompt log-probabilities).

Which probes: the first ``budget`` probes the kind can score (a task scorer; a reference), taken
round-robin over the probe set's categories (so a small budget still covers every domain). A
probe that is not in the fitted router's data (another probe set) has no outcome of the fitted
experts to compare with (and likelihoods of different references are not comparable); so the job
measures the fitted experts on it too (``total`` counts those requests). A request that fails is
counted with its reason and the job goes on (an answer that fails its scorer is an outcome of 0,
with the reason in ``detail``); the job fails when the expert got no outcome, when it is removed,
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
from typing import ClassVar

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
from coe.profile_records import OutcomeKind, ProfileJob, ProfileOutcome, fitted_outcome_kind

log = logging.getLogger("coe.serving")
BUILTIN_PROBES = "probes"   # folder of coe.configs holding the built-in probe sets (name = file stem)
DEFAULT_MAX_TOKENS = 512


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
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, strict=True, description="Longest answer to a task probe (greedy), 1 to "
                            "serving.max_tokens_limit; by default 512 or that limit if lower.")


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
        fields = ", ".join(ProfileRequest.model_fields)
        raise InvalidRequestError(f"profile.{field}: {msg} (fields: {fields})", param=f"profile.{field}") from None


def scorable(probe, kind: OutcomeKind) -> bool:
    """Whether a ``kind`` profile can score ``probe``: a task scorer (``task``), a reference (``likelihood``)."""
    from coe.profiling import TASK_SCORERS

    return probe.scorer in TASK_SCORERS if kind == "task" else bool((probe.reference or "").strip())


def choose_probes(probes: list, budget: int, kind: OutcomeKind = "likelihood") -> list:
    """The first ``budget`` probes a ``kind`` profile can score, round-robin over categories in file order
    (:func:`coe.routers.probe_selection.round_robin_order`, the order the offline simulation uses)."""
    from coe.routers.probe_selection import round_robin_order

    usable = [p for p in probes if scorable(p, kind)]
    order = round_robin_order(len(usable), [p.category or "" for p in usable])
    return [usable[i] for i in order[:budget]]


class ProfileJobs:
    """The profiles of one ingress replica (see the module docstring). ``concurrency`` defaults
    to ``serving.profile_concurrency``."""

    retries = 20             # an overloaded expert (429) is retried, not failed
    heartbeat_s = 5.0
    scorer_options: ClassVar[dict[str, dict]] = {}   # scorer name -> options, e.g. code_tests' timeout_s

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
        self._kind: OutcomeKind | None = None
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
        anything starts: 400 naming the field. Returns the request (``kind`` and ``max_tokens``
        resolved) and the chosen probes."""
        from coe.profiling import check_probe_file

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
        if "max_tokens" in req.model_fields_set and req.max_tokens > limit:
            raise InvalidRequestError(f"profile.max_tokens is {req.max_tokens}; allowed: 1 to {limit} "
                                      "(serving.max_tokens_limit)", param="profile.max_tokens")
        path = self._probe_path(req.probe)
        try:   # every probe is validated: a code_tests probe without tests is refused here, naming 'tests'
            probes = check_probe_file(path)
        except CoEError as err:   # DatasetError naming the line, or an empty file
            raise InvalidRequestError(f"profile.probe: {err.message}", param="profile.probe") from None
        usable = sum(1 for p in probes if scorable(p, kind))
        if req.budget > usable:
            what = ("a task scorer (exact_number, code_tests, choice)" if kind == "task" else "a reference answer")
            raise InvalidRequestError(f"profile.budget is {req.budget}, but {req.probe} has {usable} probes with "
                                      f"{what}; allowed: 1 to {usable}", param="profile.budget")
        req = req.model_copy(update={"kind": kind, "max_tokens": min(req.max_tokens, limit)})
        return req, choose_probes(probes, req.budget, kind)

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
        job = ProfileJob(expert=expert_id, probe=req.probe, kind=req.kind, budget=req.budget,
                         total=len(probes) + len(foreign) * len(others), created_at=now, updated_at=now)
        if self.registry is not None:
            self.registry.start_profile_job(job, stale_before=now - self.stale_after_s)
        self._jobs[expert_id] = job
        work = [(p, expert_id) for p in probes] + [(p, e) for p in foreign for e in others]
        self._tasks[expert_id] = asyncio.get_running_loop().create_task(self._run(job, work, req))
        log.info("profiling expert %s on %d probe(s) of %s by %s (%d request(s))", expert_id, len(probes), req.probe,
                 req.kind, job.total)
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

    async def _run(self, job: ProfileJob, work: list, req: ProfileRequest) -> None:
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.concurrency)
        outcomes: list[ProfileOutcome] = []

        async def one(probe, eid):
            async with self._gate:
                if job.state == "queued":
                    self._save(job, state="running", started_at=time.time())
                try:
                    outcomes.append(await self._measure(eid, probe, job.expert, req))
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

    async def _measure(self, expert_id: str, probe, profiled_by: str, req: ProfileRequest) -> ProfileOutcome:
        """One outcome of ``expert_id`` on ``probe``, scored as ``req.kind`` (see the module docstring)."""
        from coe.profiling import task_cell

        expert = self.service.catalog.get(expert_id)
        if expert is None:
            raise ExpertNotFoundError(f"expert {expert_id!r} was removed")
        if req.kind == "likelihood":
            from coe.likelihood_profile import likelihood_cell

            lps, _ = await self._answer_logprobs(expert, probe.query, probe.reference)
            nll = -sum(lps) / len(lps)
            cell = likelihood_cell(nll, len(lps), float(expert.cost))
        elif probe.scorer == "choice":   # option likelihoods, no generation
            from coe.likelihood_profile import MeasuredLikelihood

            table, tokens = {}, 0
            for option in probe.choices:   # one at a time: the job's concurrency bounds this expert's load
                table[(probe.query, option)], n = await self._answer_logprobs(expert, probe.query, option)
                tokens = max(tokens, n)
            cell = await asyncio.to_thread(task_cell, probe, None, {"tokens": tokens}, float(expert.cost),
                                           scorer=self._scorer(probe.scorer), likelihood=MeasuredLikelihood(table))
        else:
            from coe.types import ChatMessage

            greedy = {"max_tokens": req.max_tokens, "temperature": 0.0}
            out = await self._send(expert, self._request(expert, greedy,
                                                         messages=[ChatMessage(role="user", content=probe.query)]))
            usage = {"tokens": out.prompt_tokens + out.completion_tokens, "completion_tokens": out.completion_tokens}
            # code_tests waits for its sandboxed subprocess: off the event loop
            cell = await asyncio.to_thread(task_cell, probe, out.text, usage, float(expert.cost),
                                           scorer=self._scorer(probe.scorer))
        outcome, cost, detail = cell
        return ProfileOutcome(expert=expert_id, probe_id=probe.id, query=probe.query, category=probe.category,
                              kind=req.kind, outcome=outcome, cost=cost, detail=detail, profiled_by=profiled_by)

    def _scorer(self, name: str):
        from coe.eval.base import get_scorer

        return get_scorer(name, **self.scorer_options.get(name, {}))

    async def _answer_logprobs(self, expert, query: str, answer: str) -> tuple[list[float], int]:
        """The log-probability of each token of ``answer`` after ``query`` under ``expert`` (one
        scoring request, :mod:`coe.likelihood_profile`), and the prompt's tokens."""
        from coe.likelihood_profile import (
            SCORING_SAMPLING,
            ScoringError,
            answer_logprobs,
            scoring_prompt,
        )

        sp = scoring_prompt(await self._tokenizer(expert), query, answer)
        out = await self._send(expert, self._request(expert, SCORING_SAMPLING, prompt_token_ids=list(sp.token_ids)))
        try:
            return answer_logprobs(out.prompt_logprobs, sp), len(sp.token_ids)
        except ScoringError as err:
            raise InvalidRequestError(str(err)) from None

    @staticmethod
    def _request(expert, sampling: dict, *, messages=None, prompt_token_ids=None):
        """A request pinned to ``expert`` (its adapter for a LoRA): chat ``messages`` or ``prompt_token_ids``."""
        from coe.types import GenerationRequest, SamplingParams

        return GenerationRequest(request_id=f"profile-{uuid.uuid4().hex[:16]}", messages=messages,
                                 prompt_token_ids=prompt_token_ids, sampling=SamplingParams(**sampling),
                                 adapter=expert.id if isinstance(expert, LoraExpert) else None, expert=expert.id)

    async def _send(self, expert, request):
        """One request through admission control and the backend (no fallback: the measurement
        must be of this expert); its GenerationOutput. An overloaded expert is retried."""
        from coe.serving.api.admission import Deadline
        from coe.serving.deployments.spec import server_id_of

        service = self.service
        lora = isinstance(expert, LoraExpert)
        deadline = Deadline(service.config.serving.request_timeout_s)
        for attempt in range(self.retries):
            try:
                await service.admission.acquire(expert.id, deadline)
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
            service.admission.release(expert.id)
        return served.output

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

    def refit(self) -> None:
        """Refit the served router on the fitted data plus every stored profile of a live expert
        and of the data's outcome kind (blocking: call in a worker thread while serving)."""
        data = self.data()
        live = set(self.service.catalog.ids())
        from coe.routers.base import FitContext

        experts = self.service.catalog.snapshot().values()
        ctx = FitContext(descriptions={e.id: [e.description, *e.examples] for e in experts},
                         skills={e.id: list(e.skills) for e in experts},
                         categories={e.id: e.category for e in experts if e.category}, embed=data.embed)
        router = data.refit(self._usable_outcomes(), live, ctx)
        self.service.router.replace_fitted(router)

    async def refresh(self) -> None:
        """Refit after the stored outcomes changed (an expert removed, here or on another replica)."""
        if self._data is None and not self._stored_outcomes():
            return
        try:
            await asyncio.to_thread(self.refit)
        except Exception:
            log.exception("could not refit the router on the stored profiles")
