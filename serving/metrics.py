"""Prometheus metrics of the service (one registry per ingress, served at ``/metrics``).

Series (all prefixed ``coe_``):
``requests_total{expert,endpoint}``, ``request_errors_total{expert,code}``,
``routing_latency_seconds`` (histogram, new queries), ``routing_batch_size`` (histogram, queries per micro-batch), ``routing_cache_hits_total``, ``queue_depth{expert}`` (requests in flight at the
ingress per expert), ``generated_tokens_total{expert}`` (its rate is tokens/s), ``tokens_per_second{expert}``
(over the last ``window_s`` seconds), ``request_latency_seconds{expert}`` and
``time_to_first_token_seconds{expert}`` (both from the request's arrival, routing included),
``fallbacks_total{expert,fallback}``, ``cancelled_total{expert}``, ``recruited_total{expert,role}`` (calls of recruit-and-aggregate requests,
role ``answer`` or ``aggregate``), ``expert_ready{expert}`` and ``server_queue_depth{server}`` (requests
waiting in an engine's own queue, e.g. the mixture's batching window, read at scrape time).
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the route)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """Thread-safe (prometheus_client is); tokens/s uses its own lock."""

    def __init__(self, window_s: float = 10.0) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("coe_requests_total", "Requests per expert and endpoint", ["expert", "endpoint"], registry=r)
        self.errors = Counter("coe_request_errors_total", "Failed requests per expert and error code", ["expert", "code"], registry=r)
        self.routing = Histogram("coe_routing_latency_seconds", "Time to route one new query (embedded by the model; cache hits are in routing_cache_hits_total)", buckets=_LATENCY, registry=r)
        self.routing_batch = Histogram("coe_routing_batch_size", "Queries embedded together in one ingress routing batch", buckets=_BATCH, registry=r)
        self.routing_cache_hits = Counter("coe_routing_cache_hits_total", "Routed queries whose embedding came from the cache", registry=r)
        self.queue = Gauge("coe_queue_depth", "Requests in flight per expert", ["expert"], registry=r)
        self.tokens = Counter("coe_generated_tokens_total", "Completion tokens generated", ["expert"], registry=r)
        self.tps = Gauge("coe_tokens_per_second", "Completion tokens per second over the recent window", ["expert"], registry=r)
        self.latency = Histogram("coe_request_latency_seconds", "End-to-end request latency", ["expert"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("coe_time_to_first_token_seconds", "Time to the first streamed token", ["expert"], buckets=_LATENCY, registry=r)
        self.fallbacks = Counter("coe_fallbacks_total", "Requests retried on a fallback expert", ["expert", "fallback"], registry=r)
        self.cancelled = Counter("coe_cancelled_total", "Streams cancelled because the client went away", ["expert"], registry=r)
        self.recruited = Counter("coe_recruited_total", "Calls of recruit-and-aggregate requests per expert (role: answer or aggregate)", ["expert", "role"], registry=r)
        self.server_queue = Gauge("coe_server_queue_depth", "Requests waiting in an expert server engine's own queue", ["server"], registry=r)
        self.ready = Gauge("coe_expert_ready", "1 when the expert's engine has loaded", ["expert"], registry=r)
        self._window_s = window_s
        self._recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def observe_routing(self, seconds: float, *, cached: bool) -> None:
        """One routed query: new queries go to the latency histogram, cache hits to their counter."""
        if cached:
            self.routing_cache_hits.inc()
        else:
            self.routing.observe(seconds)

    def add_tokens(self, expert: str, n: int) -> None:
        self.tokens.labels(expert).inc(n)
        now = time.monotonic()
        with self._lock:
            dq = self._recent[expert]
            dq.append((now, n))
            self._trim(dq, now)

    def _trim(self, dq: collections.deque, now: float) -> None:
        while dq and dq[0][0] < now - self._window_s:
            dq.popleft()

    def render(self) -> bytes:
        now = time.monotonic()
        with self._lock:
            for expert, dq in self._recent.items():
                self._trim(dq, now)
                self.tps.labels(expert).set(sum(n for _, n in dq) / self._window_s)
        return generate_latest(self.registry)
