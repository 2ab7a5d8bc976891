"""Kubernetes (KubeRay) deployment rendered from the one CoE config.

``render(config_path, gpu=...)`` returns the manifests (plain dicts) that run, on a cluster with
the KubeRay operator, exactly the application ``coe serve`` runs: a ``RayService`` whose
``serveConfigV2`` imports ``coe.serving.app:app_builder`` with the whole CoE config inline, plus the
``PersistentVolumeClaim`` that holds the expert registry and runtime-registered adapters.

Modules: ``cluster_config`` (config → the config as the cluster sees it), ``sizing`` (Serve
replicas → worker-group pods), ``manifests`` (the objects), ``kustomize`` (``kubectl
kustomize`` builds, overlay patches), ``validate`` (schema checks), ``tree`` (regenerates ``k8s/``).
Nothing here imports ray, torch or vllm.
"""

from coe.tools.k8s.manifests import RenderOptions, render, render_cluster, to_yaml

__all__ = ["RenderOptions", "render", "render_cluster", "to_yaml"]
