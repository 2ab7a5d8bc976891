"""The expert registry's schema, defined once (SQLAlchemy Core), and its versioned migrations.

The same tables and the same migrations run on SQLite (the embedded default) and on PostgreSQL
(clusters). ``schema_version`` holds one row, the number of migrations applied; :func:`migrate`
applies the missing ones in one transaction, under a lock (PostgreSQL: an advisory lock;
SQLite: ``BEGIN IMMEDIATE``), so replicas that start together migrate once. A database written
by a newer coe (a version above :data:`LATEST`) is refused rather than guessed at.

The tables below are the latest shape. A change to them is a new function appended to
:data:`MIGRATIONS` that brings a database at the previous version to the new shape; released
migrations are never edited.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    text,
    update,
)

from coe.errors import ConfigError

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, nullable=False),
)

experts = Table(
    "experts",
    metadata,
    Column("id", String(64), primary_key=True),  # coe.config.EXPERT_ID_PATTERN: at most 64
    Column("kind", String(16), nullable=False),
    Column("body", Text, nullable=False),  # the validated expert config as JSON
    Column("created_at", Float, nullable=False),  # seconds since the epoch; list order
)

revision = Table(
    "registry_revision",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("revision", BigInteger, nullable=False),  # +1 on every add or remove
)

profile_outcomes = Table(
    "profile_outcomes",
    metadata,
    Column("expert_id", String(64), primary_key=True),
    Column("query_key", String(64), primary_key=True),  # sha256 of the query (coe.profile_records.query_key)
    Column("body", Text, nullable=False),  # a coe.profile_records.ProfileOutcome as JSON
    Column("created_at", Float, nullable=False),
)

profile_jobs = Table(
    "profile_jobs",
    metadata,
    Column("expert_id", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("body", Text, nullable=False),  # a coe.profile_records.ProfileJob as JSON
)

_PG_LOCK_KEY = 0x636F6572  # "coer": the advisory lock that serialises migrations


def _v1_experts(conn: Connection) -> None:
    # checkfirst: a SQLite file written before schema_version existed already has this table
    experts.create(conn, checkfirst=True)


def _v2_revision(conn: Connection) -> None:
    revision.create(conn)
    conn.execute(insert(revision).values(id=1, revision=0))


def _v3_profiles(conn: Connection) -> None:
    profile_outcomes.create(conn)
    profile_jobs.create(conn)


MIGRATIONS = (_v1_experts, _v2_revision, _v3_profiles)
LATEST = len(MIGRATIONS)


def migrate(conn: Connection, where: str) -> int:
    """Bring the database behind ``conn`` (inside a transaction) to :data:`LATEST`; returns the
    version it was at. Raises :class:`ConfigError` for a database newer than this coe."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    schema_version.create(conn, checkfirst=True)
    current = conn.execute(select(schema_version.c.version)).scalar()
    if current is None:
        conn.execute(insert(schema_version).values(version=0))
        current = 0
    if current > LATEST:
        raise ConfigError(
            f"expert registry {where} has schema version {current}, newer than this coe knows "
            f"({LATEST}): upgrade coe, or point serving.registry_url / registry_path elsewhere"
        )
    for step in MIGRATIONS[current:]:
        step(conn)
    if current < LATEST:
        conn.execute(update(schema_version).values(version=LATEST))
    return current
