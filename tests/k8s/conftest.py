"""Fixtures for the Kubernetes tests: the KubeRay CRDs and renders of the default config."""

from __future__ import annotations

from pathlib import Path

import pytest

from coe.paths import default_config_path


@pytest.fixture(scope="session")
def crd_dir(shared_data) -> Path:
    path = shared_data / "k8s-schemas"
    if not (path / "ray.io_rayservices.yaml").is_file():
        pytest.skip(f"KubeRay CRDs are absent from {path}")
    return path


@pytest.fixture(scope="session")
def default_config() -> Path:
    return default_config_path()

