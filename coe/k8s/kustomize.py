"""A small ``kustomize build`` for the ``k8s/`` tree (no kustomize binary needed).

Supported ``kustomization.yaml`` keys: ``apiVersion``, ``kind``, ``resources`` (YAML files or
folders holding a kustomization), ``patches`` (JSON6902: a list of operations, inline as
``patch`` or in a file at ``path``, with a ``target``), and ``namespace``. Anything else is
refused by name rather than ignored, so a build here never silently differs from the real
``kubectl apply -k``. JSON6902 is used instead of strategic merge because kustomize treats the
lists of custom resources (a RayService's ``workerGroupSpecs``) as atomic in a strategic merge.
"""

from __future__ import annotations

import copy
from pathlib import Path

from coe.errors import ConfigError

SUPPORTED = {"apiVersion", "kind", "resources", "patches", "namespace"}
NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")


def _load_all(path: Path) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomization(folder: Path) -> tuple[Path, dict]:
    import yaml

    for name in NAMES:
        if (folder / name).is_file():
            data = yaml.safe_load((folder / name).read_text()) or {}
            unknown = sorted(set(data) - SUPPORTED)
            if unknown:
                raise ConfigError(
                    f"{folder / name}: unsupported key(s) {', '.join(unknown)}; supported: {', '.join(sorted(SUPPORTED))}"
                )
            return folder / name, data
    raise ConfigError(f"{folder} has no kustomization.yaml")


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ConfigError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, parts: list[str], where: str):
    node = doc
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    return node


def apply_json6902(doc: dict, ops: list[dict], where: str = "patch") -> dict:
    """Apply RFC 6902 operations (add, remove, replace, test) to a copy of ``doc``."""
    doc = copy.deepcopy(doc)
    for i, op in enumerate(ops):
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        if kind not in ("add", "remove", "replace", "test") or not parts:
            raise ConfigError(
                f"{where}[{i}]: op {kind!r} on {op.get('path')!r}; allowed: add, remove, replace, test"
            )
        try:
            node, last = _parent(doc, parts, where), parts[-1]
            if isinstance(node, list):
                index = len(node) if last == "-" else int(last)
                if kind == "add":
                    node.insert(index, copy.deepcopy(op["value"]))
                elif kind == "remove":
                    del node[index]
                elif kind == "replace":
                    node[index] = copy.deepcopy(op["value"])
                elif node[index] != op["value"]:
                    raise ConfigError(f"{where}[{i}]: test failed at {op['path']}")
            else:
                if kind in ("remove", "replace", "test") and last not in node:
                    raise KeyError(last)
                if kind == "remove":
                    del node[last]
                elif kind == "test":
                    if node[last] != op["value"]:
                        raise ConfigError(f"{where}[{i}]: test failed at {op['path']}")
                else:
                    node[last] = copy.deepcopy(op["value"])
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise ConfigError(
                f"{where}[{i}]: path {op.get('path')!r} does not exist ({err!r})"
            ) from None
    return doc


def _matches(obj: dict, target: dict) -> bool:
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {
        "group": group,
        "version": version,
        "kind": obj.get("kind"),
        "name": obj.get("metadata", {}).get("name"),
        "namespace": obj.get("metadata", {}).get("namespace"),
    }
    return all(checks.get(k) == v for k, v in target.items())


def build(folder: str | Path) -> list[dict]:
    """The objects ``kubectl apply -k folder`` would apply, in resource order."""
    import yaml

    folder = Path(folder)
    kpath, k = _kustomization(folder)
    objects: list[dict] = []
    for res in k.get("resources") or []:
        p = folder / res
        objects += build(p) if p.is_dir() else _load_all(p)
    for j, patch in enumerate(k.get("patches") or []):
        where = f"{kpath}: patches[{j}]"
        text = patch["patch"] if "patch" in patch else (folder / patch["path"]).read_text()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise ConfigError(
                f"{where}: only JSON6902 patches (a list of operations) are supported"
            )
        target = patch.get("target")
        if not target:
            raise ConfigError(f"{where}: a JSON6902 patch needs a target")
        hits = [i for i, o in enumerate(objects) if _matches(o, target)]
        if not hits:
            raise ConfigError(f"{where}: target {target} matches no resource")
        for i in hits:
            objects[i] = apply_json6902(objects[i], ops, where)
    if k.get("namespace"):
        for o in objects:
            o.setdefault("metadata", {})["namespace"] = k["namespace"]
    return objects


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
