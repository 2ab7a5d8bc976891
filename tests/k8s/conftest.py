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



@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl with Kustomize v5: the kustomize that builds k8s/ (as `kubectl apply -k` would)."""
    import shutil
    import subprocess

    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed: the kustomize checks run the real `kubectl kustomize`")
    out = subprocess.run([path, "version", "--client"], capture_output=True, text=True, check=False, timeout=60)
    if "Kustomize Version: v5" not in out.stdout:
        pytest.skip(f"kubectl at {path} has no Kustomize v5 ({out.stdout.strip()!r})")
    return path


def portable(text: str) -> str:
    """The default config's text with its relative paths made absolute (it can move elsewhere)."""
    from coe.paths import REPO_ROOT

    text = text.replace("../adapters/experts", str(REPO_ROOT / "adapters/experts"))
    return text.replace("fitted: fitted/", f"fitted: {REPO_ROOT / 'configs' / 'fitted'}/")
