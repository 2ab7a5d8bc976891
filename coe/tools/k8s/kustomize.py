"""Kustomize for the ``k8s/`` tree: builds run the real one (``kubectl kustomize``, Kustomize v5),
and :func:`diff_json6902` writes the JSON6902 patches of the overlays.

JSON6902 is used instead of strategic merge because kustomize treats the lists of custom
resources (a RayService's ``workerGroupSpecs``) as atomic in a strategic merge.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from coe.errors import ConfigError

BUILD_TIMEOUT_S = 60


def kubectl() -> str:
    """The ``kubectl`` executable; raises ConfigError saying how to get one."""
    path = shutil.which("kubectl")
    if path is None:
        raise ConfigError(
            "kubectl is not on PATH: building a kustomization folder runs `kubectl kustomize` (kubectl 1.27+, "
            "Kustomize v5). Install kubectl, or give rendered YAML files instead of folders"
        )
    return path


def build(folder: str | Path) -> list[dict]:
    """The objects ``kubectl apply -k folder`` would apply (``kubectl kustomize folder``), in
    kustomize's output order. Raises ConfigError with kustomize's own message when it fails."""
    import yaml

    folder = Path(folder)
    try:
        out = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=False,
                             timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"kubectl kustomize {folder} did not finish in {BUILD_TIMEOUT_S} s") from None
    if out.returncode != 0:
        message = " ".join(out.stderr.strip().splitlines()[:5])[:1000]
        raise ConfigError(f"kubectl kustomize {folder} failed: {message}")
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def diff_json6902(old, new, path: str = "") -> list[dict]:
    """Operations turning ``old`` into ``new`` (used to write the overlays; small, not minimal)."""
    if type(old) is not type(new):
        return [{"op": "replace", "path": path, "value": new}]
    if isinstance(old, dict):
        ops = []
        for key in old:
            sub = f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"
            ops += (
                diff_json6902(old[key], new[key], sub)
                if key in new
                else [{"op": "remove", "path": sub}]
            )
        for key in new:
            if key not in old:
                sub = f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"
                ops.append({"op": "add", "path": sub, "value": new[key]})
        return ops
    if isinstance(old, list):
        ops = []
        for i in range(min(len(old), len(new))):
            ops += diff_json6902(old[i], new[i], f"{path}/{i}")
        ops += [{"op": "add", "path": f"{path}/-", "value": v} for v in new[len(old) :]]
        ops += [
            {"op": "remove", "path": f"{path}/{i}"} for i in reversed(range(len(new), len(old)))
        ]
        return ops
    return [] if old == new else [{"op": "replace", "path": path, "value": new}]
