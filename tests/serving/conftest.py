"""Serving fixtures: a tiny config (tiny llama on the transformers engine + tiny LoRAs) and an
event loop in a thread to run the ingress logic in-process."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.serving.serving_helpers import ADMIN, LoopThread


@pytest.fixture(scope="session", autouse=True)
def admin_key_env():
    """The admin key where the service reads it, ``$COE_ADMIN_KEY`` (session-wide: module-scoped
    services are built before any function-scoped fixture runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COE_ADMIN_KEY", ADMIN)
        yield ADMIN


@pytest.fixture(scope="session")
def serving_root(tmp_path_factory, tiny_loras) -> Path:
    """A folder with an allowed adapter root holding copies of the tiny LoRAs."""
    root = tmp_path_factory.mktemp("serving")
    (root / "adapters").mkdir()
    for src in tiny_loras:
        shutil.copytree(src, root / "adapters" / src.name)
    return root


@pytest.fixture(scope="module")
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.close()
