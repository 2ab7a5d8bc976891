"""Ray Serve deployments: the ingress and the expert servers.

``spec`` and ``expert_server`` are plain Python (usable without Ray); ``ray_deployments`` and
``ingress`` import ``ray.serve``.
"""
