"""The registry's profile tables on SQLite (tests/core/test_registry_postgres.py runs the same check on PostgreSQL)."""

from __future__ import annotations

from coe.registry import ExpertRegistry
from coe.registry_schema import LATEST
from tests.core.registry_profile_checks import check_profiles_persist_and_go_with_the_expert


def test_profiles_persist_and_go_with_the_expert_sqlite(tmp_path):
    check_profiles_persist_and_go_with_the_expert(lambda: ExpertRegistry(tmp_path / "r.sqlite"))


def test_a_version_2_database_migrates_to_the_profile_tables(tmp_path):
    import sqlite3

    from sqlalchemy import create_engine

    from coe.registry_schema import MIGRATIONS, metadata

    path = tmp_path / "old.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:   # what a coe of schema version 2 wrote
        metadata.tables["schema_version"].create(conn)
        for step in MIGRATIONS[:2]:
            step(conn)
        conn.exec_driver_sql("INSERT INTO schema_version (version) VALUES (2)")
    reg = ExpertRegistry(path)
    assert reg.profile_outcomes() == [] and reg.profile_jobs() == {}
    assert sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchone()[0] == LATEST == 3
