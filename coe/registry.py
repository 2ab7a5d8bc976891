"""The persistent expert registry: experts registered at runtime, kept in a database.

Experts from the config file are not stored here; the service's live expert set is the config's
experts followed by the registry's, in registration order. One row per expert holds its
validated config (``ModelExpert`` or ``LoraExpert``) as JSON, so a restart re-creates exactly
what was registered.

Two stores, one schema (:mod:`coe.registry_schema`, with versioned migrations): an embedded
SQLite file (the default, ``serving.registry_path``; safe for the processes of one machine) and
PostgreSQL for clusters (``serving.registry_url``, password from the environment variable named
by ``serving.registry_password_env``), where every ingress replica on every node shares it.
Every call runs in its own short transaction, so an instance is thread-safe and any number of
processes may use the same database.

Errors: a database that cannot be reached raises :class:`RegistryUnavailableError` (HTTP 503),
at start-up naming the database (never its password); a SQLite file that cannot be created is a
:class:`ConfigError`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Connection, delete, exc, insert, select, update

from coe.config import CoEConfig, Expert
from coe.errors import (
    ConfigError,
    DuplicateExpertError,
    ExpertNotFoundError,
    ProfileRunningError,
    RegistryUnavailableError,
    available,
)
from coe.profile_records import ProfileJob, ProfileOutcome
from coe.registry_db import CONNECTION_ERRORS, connect, unavailable
from coe.registry_schema import experts as _experts
from coe.registry_schema import migrate
from coe.registry_schema import profile_jobs as _jobs
from coe.registry_schema import profile_outcomes as _outcomes
from coe.registry_schema import revision as _revision

_EXPERT = TypeAdapter(Expert)


def registry_path(config: CoEConfig, base_dir: Path | None = None) -> Path:
    """Where the config's SQLite registry lives: ``serving.registry_path`` (relative to
    ``base_dir``) or ``$COE_HOME/registry.sqlite``.

    Raises :class:`ConfigError` when the config names a server database instead
    (``serving.registry_url``): open that with :func:`open_registry`."""
    from coe.paths import coe_home

    if config.serving.registry_url is not None:
        raise ConfigError(
            "serving.registry_url is set, so the registry is a PostgreSQL database, not a SQLite file: "
            "open it with coe.registry.open_registry(config, base_dir)"
        )
    if config.serving.registry_path is None:
        return coe_home() / "registry.sqlite"
    path = Path(config.serving.registry_path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def open_registry(config: CoEConfig, base_dir: Path | None = None) -> ExpertRegistry:
    """The config's registry: PostgreSQL at ``serving.registry_url`` (password from the
    environment variable ``serving.registry_password_env``) or the SQLite file of
    :func:`registry_path`. Raises as :class:`ExpertRegistry` does."""
    serving = config.serving
    if serving.registry_url is not None:
        password = os.environ.get(serving.registry_password_env)
        try:
            return ExpertRegistry(serving.registry_url, password=password)
        except RegistryUnavailableError as err:
            if password is None:
                err.message = f"{err.message} (the password comes from ${serving.registry_password_env}, which is unset)"
                err.args = (err.message,)
            raise
    return ExpertRegistry(registry_path(config, base_dir))


class ExpertRegistry:
    """Experts registered at runtime, in a SQLite file or a PostgreSQL database.

    ``location`` is a file path (SQLite, created on first use) or a ``postgresql://`` URL
    without a password (``password`` is given separately). The schema is created or migrated
    on construction; raises :class:`RegistryUnavailableError` when a server database cannot
    be reached, :class:`ConfigError` when a SQLite file cannot be created or the database was
    written by a newer coe.
    """

    def __init__(self, location: str | Path, *, password: str | None = None) -> None:
        self._db = connect(location, password)
        self.path = None if self._db.dialect == "postgresql" else Path(location)
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._db.writer().begin() as conn:
                migrate(conn, self._db.shown)
        except OSError as err:
            raise ConfigError(f"expert registry {self._db.shown} cannot be opened: {err}") from None
        except CONNECTION_ERRORS as err:
            self._db.engine.dispose()
            if self.path is not None:
                raise ConfigError(f"expert registry {self.path} cannot be opened: {self._db.scrub(str(err.orig))}") from None
            raise unavailable(self._db, err, starting=True) from None
        except exc.DBAPIError as err:  # e.g. no permission to create the tables
            self._db.engine.dispose()
            raise ConfigError(f"expert registry {self._db.shown} cannot be used: {self._db.scrub(str(err.orig))}") from None

    @property
    def location(self) -> str:
        """The database, as it may be shown (a path, or the URL with the password as ``***``)."""
        return self._db.shown

    def __repr__(self) -> str:
        return f"ExpertRegistry({self.location!r})"

    @contextmanager
    def _transaction(self, *, write: bool = False) -> Iterator[Connection]:
        engine = self._db.writer() if write else self._db.engine
        try:
            with engine.begin() as conn:
                yield conn
        except CONNECTION_ERRORS as err:
            raise unavailable(self._db, err, starting=False) from None

    def list(self) -> list[Expert]:
        """Every registered expert, oldest first."""
        with self._transaction() as conn:
            rows = conn.execute(select(_experts.c.body).order_by(_experts.c.created_at, _experts.c.id)).all()
        return [_load(body, self.location) for (body,) in rows]

    def ids(self) -> list[str]:
        return [e.id for e in self.list()]

    def get(self, expert_id: str) -> Expert:
        """The registered expert; raises ExpertNotFoundError listing the registered ids."""
        with self._transaction() as conn:
            body = conn.execute(select(_experts.c.body).where(_experts.c.id == expert_id)).scalar()
        if body is None:
            raise ExpertNotFoundError(f"expert {expert_id!r} is not in the registry; registered: {available(self.ids())}")
        return _load(body, self.location)

    def revision(self) -> int:
        """A counter that grows with every add and remove (and every stored profile): a cheap
        "did anything change?" for replicas that keep a copy of the expert set and router."""
        with self._transaction() as conn:
            return int(conn.execute(select(_revision.c.revision).where(_revision.c.id == 1)).scalar_one())

    def add(self, expert: Expert) -> None:
        """Store a new expert; raises DuplicateExpertError when the id is taken."""
        # What was set, as a config file would say it: a restart validates it like the config's own
        # experts (the same defaults, the same rules), and "kind" picks the expert type back.
        body = json.dumps({**expert.model_dump(mode="json", exclude_unset=True), "kind": expert.kind})
        try:
            with self._transaction(write=True) as conn:
                conn.execute(insert(_experts).values(id=expert.id, kind=expert.kind, body=body, created_at=time.time()))
                _bump(conn)
        except exc.IntegrityError:
            raise DuplicateExpertError(f"expert {expert.id!r} is already registered") from None

    def remove(self, expert_id: str) -> None:
        """Forget an expert, its profile job and its measured outcomes; raises ExpertNotFoundError
        when it is not registered."""
        with self._transaction(write=True) as conn:
            gone = conn.execute(delete(_experts).where(_experts.c.id == expert_id)).rowcount
            if gone:
                conn.execute(delete(_outcomes).where(_outcomes.c.expert_id == expert_id))
                conn.execute(delete(_jobs).where(_jobs.c.expert_id == expert_id))
                _bump(conn)
        if not gone:
            raise ExpertNotFoundError(f"expert {expert_id!r} is not in the registry; registered: {available(self.ids())}")

    # -- profiles (coe.profile_records) -----------------------------------------------------
    def put_profile_outcomes(self, outcomes: list[ProfileOutcome], job: ProfileJob | None = None) -> None:
        """Store measured outcomes in one transaction, replacing any of the same (expert, query),
        and with them ``job``'s final state when given: a profile's outcomes and its ``done`` are
        written together or not at all. Bumps the revision so other replicas rebuild their router."""
        now = time.time()
        with self._transaction(write=True) as conn:
            for o in outcomes:
                conn.execute(delete(_outcomes).where((_outcomes.c.expert_id == o.expert) & (_outcomes.c.query_key == o.key)))
                conn.execute(insert(_outcomes).values(expert_id=o.expert, query_key=o.key, body=o.model_dump_json(),
                                                      created_at=now))
            if job is not None:
                conn.execute(update(_jobs).where(_jobs.c.expert_id == job.expert)
                             .values(state=job.state, body=job.model_dump_json()))
            _bump(conn)

    def profile_outcomes(self) -> list[ProfileOutcome]:
        """Every stored outcome, oldest first."""
        with self._transaction() as conn:
            rows = conn.execute(select(_outcomes.c.body).order_by(_outcomes.c.created_at, _outcomes.c.expert_id,
                                                                  _outcomes.c.query_key)).all()
        return [ProfileOutcome.model_validate_json(body) for (body,) in rows]

    def start_profile_job(self, job: ProfileJob, *, stale_before: float) -> None:
        """Record a new job for ``job.expert``, replacing a finished one. Raises
        :class:`ProfileRunningError` (409) while another is queued or running and its last
        heartbeat is not older than ``stale_before`` (seconds since the epoch)."""
        try:
            with self._transaction(write=True) as conn:
                body = conn.execute(select(_jobs.c.body).where(_jobs.c.expert_id == job.expert).with_for_update()).scalar()
                old = None if body is None else ProfileJob.model_validate_json(body)
                if old is not None and old.active and (old.updated_at or old.created_at) >= stale_before:
                    raise ProfileRunningError(f"a profile of expert {job.expert!r} is still {old.state} "
                                              f"({old.done}/{old.total}); wait for it to finish")
                conn.execute(delete(_jobs).where(_jobs.c.expert_id == job.expert))
                conn.execute(insert(_jobs).values(expert_id=job.expert, state=job.state, body=job.model_dump_json()))
        except exc.IntegrityError:   # another replica inserted it first
            raise ProfileRunningError(f"a profile of expert {job.expert!r} was just started elsewhere") from None

    def save_profile_job(self, job: ProfileJob) -> None:
        """Update a job's progress or outcome (a no-op once its expert was removed)."""
        with self._transaction(write=True) as conn:
            conn.execute(update(_jobs).where(_jobs.c.expert_id == job.expert)
                         .values(state=job.state, body=job.model_dump_json()))

    def profile_jobs(self) -> dict[str, ProfileJob]:
        """The latest job of every expert that has one."""
        with self._transaction() as conn:
            rows = conn.execute(select(_jobs.c.body)).all()
        jobs = [ProfileJob.model_validate_json(body) for (body,) in rows]
        return {j.expert: j for j in jobs}

    def close(self) -> None:
        """Close pooled connections (the registry stays usable; it reconnects on the next call)."""
        self._db.engine.dispose()


def _load(body: str, where: str) -> Expert:
    try:
        return _EXPERT.validate_json(body)
    except ValidationError as err:
        from coe.config import format_validation_error

        expert_id = json.loads(body).get("id", "?")
        raise ConfigError(format_validation_error(err, f"registered expert {expert_id!r} in {where}")) from None


def _bump(conn: Connection) -> None:
    conn.execute(update(_revision).where(_revision.c.id == 1).values(revision=_revision.c.revision + 1))


def with_registration_defaults(expert: Expert, config: CoEConfig) -> Expert:
    """``expert`` as it is registered at runtime: a ``model`` expert that gives no ``resources``
    gets ``serving.registered_model_resources`` (on a GPU cluster: a GPU); anything else is
    returned unchanged. Call it before the expert is loaded and stored."""
    defaults = config.serving.registered_model_resources
    if expert.kind != "model" or defaults is None or "resources" in expert.model_fields_set:
        return expert
    return expert.model_copy(update={"resources": defaults.model_copy(deep=True)})


def live_experts(config: CoEConfig, registry: ExpertRegistry | None) -> list[Expert]:
    """The config's experts followed by the registry's (registry rows that clash with a config id
    are skipped: the config file wins)."""
    experts = list(config.experts)
    if registry is not None:
        ids = {e.id for e in experts}
        experts += [e for e in registry.list() if e.id not in ids]
    return experts
