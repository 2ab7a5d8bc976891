"""Where the project keeps state on disk: ``$COE_HOME`` (default ``~/.cache/coe``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def coe_home() -> Path:
    """The cache/state root; created on first use."""
    home = Path(os.environ.get("COE_HOME", Path.home() / ".cache" / "coe")).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def models_dir() -> Path:
    path = coe_home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_config_path() -> Path:
    """The embedded default config: ``configs/default.yaml``, installed as ``coe.configs``.

    Found through the package, so it is the same file in a checkout, an editable install and a
    wheel (where its relative adapter paths point into the installed ``coe.adapters``)."""
    from importlib.resources import files

    return Path(str(files("coe.configs") / "default.yaml"))
