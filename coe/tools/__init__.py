"""The tools above serving: they use every layer, and no layer uses them.

``cli`` (the ``coe`` command), ``k8s`` (KubeRay manifests), ``profiling`` (``coe experts
profile``: profiles through a running service), ``ray_local`` (the local Ray cluster ``coe
serve`` starts), ``bootstrap`` (``python3.11 -m coe.tools.bootstrap serve|test`` on a fresh
clone; standard library only) and ``models`` (``coe models prepare``). The layers are drawn in
``docs/architecture.md`` and checked by ``tests/core/test_structure.py``.
"""
