"""Many whole-model experts on one accelerator: host copies, swapping, expert-grouped scheduling.

- :mod:`coe.serving.pool.layout`: a model's tensors as views of one flat buffer (a swap is one copy).
- :mod:`coe.serving.pool.store`: experts read once into (pinned) host memory.
- :mod:`coe.serving.pool.pool`: :class:`ExpertPool`, at most M experts resident, LRU, pinned, budget.
- :mod:`coe.serving.pool.scheduler`: :class:`GroupedQueue`, which expert's requests go next.
- :mod:`coe.serving.pool.engine`: :class:`PoolEngine`, the Engine (``@register_engine("pool")``).

Importing this package imports nothing heavy; the submodules import torch when used.
"""

__all__ = ["ExpertPool", "GroupedQueue", "PoolEngine"]


def __getattr__(name: str):
    if name == "ExpertPool":
        from coe.serving.pool.pool import ExpertPool

        return ExpertPool
    if name == "GroupedQueue":
        from coe.serving.pool.scheduler import GroupedQueue

        return GroupedQueue
    if name == "PoolEngine":
        from coe.serving.pool.engine import PoolEngine

        return PoolEngine
    raise AttributeError(name)
