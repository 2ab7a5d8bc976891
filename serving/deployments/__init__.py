"""Ray Serve deployments: the ingress, the expert servers, expert-grouped batching.

``spec``, ``batcher`` and ``expert_server`` are plain Python (usable without Ray);
``ray_deployments`` and ``ingress`` import ``ray.serve``.
"""
