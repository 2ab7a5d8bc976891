"""The expert registry's connection to its database: a SQLite file or a PostgreSQL server.

:func:`connect` builds the SQLAlchemy engine for either; :func:`unavailable` turns a driver's
connection failure into :class:`coe.errors.RegistryUnavailableError`. Passwords never appear in
what this module returns, raises or logs: URLs are rendered with ``***``, driver messages are
scrubbed, and SQL parameters are kept out of exception text (``hide_parameters``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from coe.errors import ConfigError, RegistryUnavailableError

log = logging.getLogger("coe.registry")

CONNECT_TIMEOUT_S = 5
"""How long one connection attempt to a PostgreSQL registry waits before it is unavailable."""

CONNECTION_ERRORS = (exc.OperationalError, exc.InterfaceError, exc.DisconnectionError, exc.TimeoutError)
"""Driver errors that mean "the database cannot be reached or used now" (not a bad request)."""


@dataclass(frozen=True)
class Database:
    """An engine and how to name it in messages (``shown``: no password)."""

    engine: Engine
    shown: str
    password: str | None = None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def writer(self) -> Engine:
        """The engine for read-write transactions (SQLite: ``BEGIN IMMEDIATE``)."""
        return self.engine.execution_options(coe_write=True)

    def scrub(self, message: str) -> str:
        first = (message.strip().splitlines() or [""])[0][:300]
        return first.replace(self.password, "***") if self.password else first


def _sqlite(path: Path) -> Database:
    # NullPool: every call opens the file, as several processes (replicas) share it.
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool, connect_args={"timeout": 30},
                           hide_parameters=True)

    @event.listens_for(engine, "connect")
    def _autocommit_driver(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy's BEGIN below, not pysqlite's implicit one

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        # IMMEDIATE takes the write lock up front: two writers queue instead of deadlocking.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("coe_write") else "BEGIN")

    return Database(engine, str(path))


def _postgres(url: str, password: str | None) -> Database:
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")  # the driver coe installs (psycopg 3)
    if u.drivername != "postgresql+psycopg":
        raise ConfigError(f"registry URL {u.render_as_string(hide_password=True)}: the driver must be psycopg "
                          "(postgresql:// or postgresql+psycopg://)")
    if password:
        u = u.set(password=password)
    engine = create_engine(
        u, pool_pre_ping=True, pool_size=2, max_overflow=4, pool_recycle=1800, hide_parameters=True,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S, "application_name": "coe-registry"},
    )
    return Database(engine, u.render_as_string(hide_password=True), password or None)


def connect(location: str | Path, password: str | None = None) -> Database:
    """The database at ``location``: a PostgreSQL URL (``postgresql://...``; ``password`` is set
    into it) or a SQLite file path. Connects lazily: nothing is opened yet."""
    if isinstance(location, str) and "://" in location:
        return _postgres(location, password)
    return _sqlite(Path(location))


def unavailable(db: Database, err: Exception, *, starting: bool) -> RegistryUnavailableError:
    """The error for a connection failure. At start-up it names the database and the reason;
    while serving, the HTTP message says what is refused and the details go to the log."""
    reason = db.scrub(str(getattr(err, "orig", None) or err))
    if starting:
        return RegistryUnavailableError(f"expert registry {db.shown} is unreachable: {reason}")
    log.warning("expert registry %s is unavailable: %s", db.shown, reason)
    return RegistryUnavailableError(
        "the expert registry database is unavailable: registrations and removals are refused until it "
        "is back; the current experts keep serving. Retry later"
    )
