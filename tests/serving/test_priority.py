"""``engine.nice``: every thread of a replica, and what it starts afterwards, runs at the lower priority."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import os, subprocess, sys, threading
from coe.serving.deployments.ray_deployments import lower_priority

ready, done = threading.Event(), threading.Event()
seen = {}
def other():
    ready.set(); done.wait()
    seen["other"] = os.getpriority(os.PRIO_PROCESS, 0)
t = threading.Thread(target=other); t.start(); ready.wait()
before = os.getpriority(os.PRIO_PROCESS, 0)
lower_priority(3)
done.set(); t.join()
child = subprocess.run([sys.executable, "-c", "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"],
                       capture_output=True, text=True, check=True).stdout.strip()
print(before, os.getpriority(os.PRIO_PROCESS, 0), seen["other"], child)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_lower_priority_reaches_every_thread_and_child_process():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120)
    before, main, other, child = map(int, out.stdout.split())
    want = min(19, before + 3)
    assert (main, other, child) == (want, want, want)
