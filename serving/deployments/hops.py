"""Opt-in per-request hop timestamps: where a request's time goes between the processes.

Set ``COE_HOPS=<file>`` in the environment the replicas inherit (``bench/serve_overhead.py
--hops`` does) and each hop of a request appends one line to that file::

    <time.monotonic()> <pid> <stage> <request id or ->

``time.monotonic`` is the system-wide ``CLOCK_MONOTONIC`` on Linux, so stamps from the proxy's
client, the ingress and the expert replica on one host compare directly (not across hosts). The
stages, in the order a streamed request meets them: ``ingress.enter`` (the ingress replica's
ASGI app is called), ``route.enter`` (the chat handler, body parsed), ``backend.call`` (routed,
admitted, dispatched: the Serve handle is called), ``replica.enter`` (the expert replica's
``stream``), ``server.prepared`` (tokenized, handed to the engine), ``server.first`` (the
engine's first delta), ``backend.first`` (that delta back in the ingress), ``route.response``
(the handler returns the streaming response) and ``ingress.first_body`` (the first body bytes
handed to Serve for the proxy); ``backend.item`` marks each later stream item the ingress gets
(how many items an answer takes). Unset (the default), :func:`stamp` is one dictionary lookup
and nothing is written; a diagnosis tool, not for production (one ``write`` per stamp).
"""

from __future__ import annotations

import os
import time

ENV = "COE_HOPS"


def stamp(stage: str, request_id: str | None = None) -> None:
    """Append ``stage`` (and ``request_id``) at this instant to ``$COE_HOPS``; nothing when unset."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = f"{time.monotonic():.6f} {os.getpid()} {stage} {request_id or '-'}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)   # one short O_APPEND write: lines of concurrent processes do not interleave
    finally:
        os.close(fd)


def read(path: str) -> list[tuple[float, int, str, str]]:
    """The stamps in ``path``, ``(time, pid, stage, request id)``, oldest first."""
    out = []
    with open(path) as f:
        for line in f:
            t, pid, stage, rid = line.split()
            out.append((float(t), int(pid), stage, rid))
    return sorted(out)
