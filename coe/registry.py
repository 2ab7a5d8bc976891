"""The persistent expert registry: experts registered at runtime, kept in SQLite.

Experts from the config file are not stored here; the service's live expert set is the config's
experts followed by the registry's, in registration order. One row per expert holds its
validated config (``ModelExpert`` or ``LoraExpert``) as JSON, so a restart re-creates exactly
what was registered. Several processes (the ingress replicas, the app builder) may open the same
file; every call uses its own short transaction, so the class is thread- and process-safe.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from pydantic import TypeAdapter

from coe.config import CoEConfig, Expert
from coe.errors import ConfigError, DuplicateExpertError, ExpertNotFoundError, available

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""

_EXPERT = TypeAdapter(Expert)


def registry_path(config: CoEConfig, base_dir: Path | None = None) -> Path:
    """Where the config's registry lives: ``serving.registry_path`` (relative to ``base_dir``)
    or ``$COE_HOME/registry.sqlite``."""
    from coe.paths import coe_home

    if config.serving.registry_path is None:
        return coe_home() / "registry.sqlite"
    path = Path(config.serving.registry_path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


class ExpertRegistry:
    """Experts registered at runtime, persisted in one SQLite file (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise ConfigError(f"expert registry {self.path} cannot be opened: {err}") from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None)

    def list(self) -> list[Expert]:
        """Every registered expert, oldest first."""
        with self._lock, self._connect() as db:
            rows = db.execute("SELECT body FROM experts ORDER BY created_at, id").fetchall()
        return [_EXPERT.validate_python(json.loads(body)) for (body,) in rows]

    def ids(self) -> list[str]:
        return [e.id for e in self.list()]

    def get(self, expert_id: str) -> Expert:
        """The registered expert; raises ExpertNotFoundError listing the registered ids."""
        with self._lock, self._connect() as db:
            row = db.execute("SELECT body FROM experts WHERE id = ?", (expert_id,)).fetchone()
        if row is None:
            raise ExpertNotFoundError(f"expert {expert_id!r} is not in the registry; registered: {available(self.ids())}")
        return _EXPERT.validate_python(json.loads(row[0]))

    def add(self, expert: Expert) -> None:
        """Store a new expert; raises DuplicateExpertError when the id is taken."""
        body = json.dumps(expert.model_dump(mode="json", exclude_unset=False))
        try:
            with self._lock, self._connect() as db:
                db.execute(
                    "INSERT INTO experts (id, kind, body, created_at) VALUES (?, ?, ?, ?)",
                    (expert.id, expert.kind, body, time.time()),
                )
        except sqlite3.IntegrityError:
            raise DuplicateExpertError(f"expert {expert.id!r} is already registered") from None

    def remove(self, expert_id: str) -> None:
        """Forget an expert; raises ExpertNotFoundError when it is not registered."""
        with self._lock, self._connect() as db:
            cur = db.execute("DELETE FROM experts WHERE id = ?", (expert_id,))
        if cur.rowcount == 0:
            raise ExpertNotFoundError(f"expert {expert_id!r} is not in the registry; registered: {available(self.ids())}")


def live_experts(config: CoEConfig, registry: ExpertRegistry | None) -> list[Expert]:
    """The config's experts followed by the registry's (registry rows that clash with a config id
    are skipped: the config file wins)."""
    experts = list(config.experts)
    if registry is not None:
        ids = {e.id for e in experts}
        experts += [e for e in registry.list() if e.id not in ids]
    return experts
