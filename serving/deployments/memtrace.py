"""Opt-in memory diagnostics inside a replica: ``tracemalloc`` snapshot diffs and the RSS.

Set ``COE_TRACEMALLOC=<frames>`` (1-64; unset, empty or ``0`` is off) in the environment the
replicas inherit, and the expert-server deployments and the ingress start ``tracemalloc`` at the
end of their construction (an engine loads several times slower traced, and what grows per
request is allocated after it). Each then answers ``memory_diff(limit)`` (a deployment method, called by
handle; ``bench/soak.py --tracemalloc`` does) with what its Python heap gained or lost since the
previous call. Off, nothing is traced and the method reports only the RSS.

Tracing costs memory (a traceback per live block) and time (every allocation), so it is for a
diagnosis run, never for production.
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import tracemalloc

from coe.errors import ConfigError

ENV = "COE_TRACEMALLOC"
MAX_FRAMES = 64
# our own bookkeeping: the snapshot machinery and the import system's one-off allocations
_IGNORED = (tracemalloc.__file__, "<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>",
            "<unknown>")


def frames_from_env(environ=None) -> int:
    """The number of frames ``COE_TRACEMALLOC`` asks for; 0 when unset, empty or ``0``.

    Raises :class:`~coe.errors.ConfigError` naming the variable when it is not an integer in 0-64."""
    raw = (os.environ if environ is None else environ).get(ENV, "").strip()
    if not raw:
        return 0
    try:
        frames = int(raw)
    except ValueError:
        frames = -1
    if not 0 <= frames <= MAX_FRAMES:
        raise ConfigError(f"{ENV}={raw!r}: set it to the number of stack frames to trace per allocation, "
                         f"an integer from 1 to {MAX_FRAMES} (0 or unset: off)")
    return frames


def rss_mib() -> float:
    """This process's resident set size now, MiB (Linux ``/proc``; elsewhere its peak)."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


class MemTrace:
    """``tracemalloc`` started with ``frames`` frames, and the snapshot of the previous diff.

    Not thread-safe: one caller at a time (a replica's method runs on its event loop)."""

    def __init__(self, frames: int) -> None:
        if not 1 <= frames <= MAX_FRAMES:
            raise ValueError(f"frames must be from 1 to {MAX_FRAMES}, got {frames}")
        self.frames = frames
        if not tracemalloc.is_tracing():
            tracemalloc.start(frames)
        self.previous = self._snapshot()
        self.calls = 0

    @classmethod
    def of(cls, frames: int) -> MemTrace | None:
        """A started :class:`MemTrace` of ``frames`` frames, or None for 0 (off: no cost)."""
        return cls(frames) if frames else None

    @classmethod
    def from_env(cls, environ=None) -> MemTrace | None:
        """:meth:`of` the frames ``COE_TRACEMALLOC`` asks for (:func:`frames_from_env`)."""
        return cls.of(frames_from_env(environ))

    @staticmethod
    def _snapshot() -> tracemalloc.Snapshot:
        gc.collect()   # what is garbage but not yet collected is not a leak
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, name) for name in _IGNORED])

    def diff(self, limit: int = 20) -> dict:
        """What the heap gained since the previous call (or since tracing started), largest
        first; the new snapshot becomes the reference for the next call.

        Returns plain data: ``traced_mib`` (heap now), ``traced_diff_kib``, ``top`` (up to
        ``limit`` allocation tracebacks: ``where`` file:line of the allocation, ``size_diff_kib``,
        ``count_diff``, ``size_kib``, ``count``, ``frames`` innermost first) and ``by_file``
        (the same totals per source file)."""
        now = self._snapshot()
        before, self.previous = self.previous, now
        self.calls += 1
        top = [_stat(s) for s in now.compare_to(before, "traceback")[:limit]]
        by_file = [{"file": s.traceback[0].filename, "size_diff_kib": round(s.size_diff / 1024, 1),
                    "count_diff": s.count_diff} for s in now.compare_to(before, "filename")[:limit]]
        size = sum(t.size for t in now.traces)
        return {"traced_mib": round(size / 2**20, 2),
                "traced_diff_kib": round((size - sum(t.size for t in before.traces)) / 1024, 1),
                "top": top, "by_file": by_file}


def _stat(s: tracemalloc.StatisticDiff, frames: int = 10) -> dict:
    innermost_first = list(reversed(s.traceback))   # tracemalloc keeps the oldest frame first
    inner = innermost_first[0]
    return {"where": f"{inner.filename}:{inner.lineno}", "size_diff_kib": round(s.size_diff / 1024, 1),
            "count_diff": s.count_diff, "size_kib": round(s.size / 1024, 1), "count": s.count,
            "frames": [f"{f.filename}:{f.lineno}" for f in innermost_first[:frames]]}


def memory_report(trace: MemTrace | None, limit: int = 20) -> dict:
    """What a replica's ``memory_diff`` answers: pid, RSS (MiB) and, when tracing, the diff."""
    out = {"pid": os.getpid(), "rss_mib": rss_mib(), "tracing": trace is not None}
    if trace is not None:
        out.update(trace.diff(max(1, min(int(limit), 200))))
    return out
