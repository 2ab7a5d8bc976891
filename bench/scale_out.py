"""Scale-out on a local multi-node Ray cluster (issue #13 item 6, item 4's figures).

A head (no replicas) and two worker nodes on this machine, loopback only
(``coe.tools.ray_local.LocalCluster``). What runs is the ``serveConfigV2`` that ``coe k8s render``
writes for a small project, its container paths mapped back to this machine and applied as
``serve deploy`` does (``coe.tools.k8s.local``), as in ``tests/serving/test_multinode.py``.

The engine does next to nothing, so that the ingress (HTTP, validation, routing, admission,
the call to the expert server) is what is measured: the ``hf`` engine on a random 2-layer,
width-64 llama answering ``max_tokens: 1``. (It is a real engine on a toy model, not a stub:
the engine's work per request stays in the figures, small but not zero.)

Measured, in one run:

1. **Routed requests/s with 1 vs 2 ingress replicas**: two applications side by side from the
   same render, ``coe`` (2 ingress replicas, ``/``) and ``coe1`` (the same with 1, ``/one``),
   each with its own 2 expert-server replicas; ``--clients`` closed-loop clients for
   ``--seconds`` per variant, rounds interleaved (``bench.stats``); the per-round ratio.
2. **Registration visibility**: register a LoRA through one ingress replica, then ask the
   application until a response from the *other* replica serves it (pinned and routed);
   seconds from the registration's answer, ``--registrations`` times. Bound stated in the
   README: ``serving.registry_poll_s`` (default 2 s) plus one reload.
3. **Node failure**: under ``--clients`` clients, kill one worker node (its raylet and every
   process on it, no grace): requests failed (and how), time to fail fast of the requests in
   flight, time until Serve has re-placed every replica on the surviving node, time until every
   request succeeds again, registered experts before/after.

Usage (on a quiet machine only)::

    ../shared/tools/quiet-run -- .venv/bin/python bench/scale_out.py [--clients 16] [--seconds 15] [--rounds 3]

Writes ``bench/results/scale_out.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import RunRecord, write_results
from bench.stats import fmt, paired_ratio, summary

ADMIN = "scale-out-bench-key"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
QUERIES = ["what is 2 + 3 ?", "what is the capital of france ?", "1 + 1 = ?", "what is the capital city ?"]


def tiny_project(root: Path) -> Path:
    """A project with a random 2-layer llama, two tiny LoRAs and its config (as the test's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import _tiny_tokenizer
    from tests.helpers import make_lora

    model = root / "models" / "tiny"
    model.mkdir(parents=True)
    tok = _tiny_tokenizer(model)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(model, safe_serialization=True)
    make_lora(model, root / "adapters" / "a", rank=4, seed=1)
    make_lora(model, root / "adapters" / "c", rank=2, seed=3, targets=("gate_proj", "up_proj", "down_proj"))
    return model


def project_config(root: Path, ingress_replicas: int, name: str) -> Path:
    import yaml

    engine = {"kind": "hf", "max_model_len": 128, "max_lora_rank": 8, "cpu_threads": 1}
    config = {
        "router": {"name": "centroid", "embedder": "minilm-l6-m2v", "default_expert": "tiny"},
        "experts": [
            {"id": "tiny", "kind": "model", "model": "./models/tiny", "engine": engine,
             "description": "general questions and facts", "examples": ["what is the capital of france ?"],
             "resources": {"num_cpus": 0.25, "num_replicas": 2}},
            {"id": "tiny-a", "kind": "lora", "base": "tiny", "adapter": "./adapters/a",
             "description": "math and arithmetic", "examples": ["what is 2 + 3 ?", "1 + 1 = ?"]},
        ],
        "serving": {"adapter_roots": ["./adapters"], "max_tokens_default": 1, "max_tokens_limit": 4,
                    "ingress": {"num_cpus": 0.25, "num_replicas": ingress_replicas}},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def rendered(root: Path, state: Path, port: int) -> dict:
    """One serve config holding both applications, each exactly as rendered (paths mapped)."""
    from coe.tools.k8s.local import localize, rendered_serve_config
    from coe.tools.k8s.manifests import RenderOptions, render

    out = None
    for name, replicas, prefix in (("coe", 2, "/"), ("coe1", 1, "/one")):
        manifests = render(project_config(root, replicas, name),
                           options=RenderOptions(project=str(root), image_cpu="example.com/me/coe:1"))
        cfg = localize(rendered_serve_config(manifests), project=root, state=state, port=port)
        app = cfg["applications"][0]
        app["name"], app["route_prefix"] = name, prefix
        if out is None:
            out = cfg
        else:
            out["applications"].append(app)
    return out


def wait_ready(base: str, timeout_s: float = 300) -> None:
    import httpx
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if all(a in apps and apps[a].status == "RUNNING" for a in ("coe", "coe1")):
            try:
                if all(httpx.get(f"{base}{p}/readyz", timeout=10).status_code == 200 for p in ("", "/one")):
                    return
            except httpx.HTTPError:
                pass
        time.sleep(1)
    raise SystemExit(f"not ready after {timeout_s} s: {serve.status()}")


# --------------------------------------------------------------------------- load


class Load:
    """``clients`` closed-loop clients on their own thread and event loop; every request's
    (start, end, outcome) is kept. Outcome: the status code, or the transport error's name."""

    def __init__(self, url: str, clients: int, *, timeout_s: float = 60) -> None:
        self.url, self.clients, self.timeout_s = url, clients, timeout_s
        self.results: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, float, str]]:
        self._stop.set()
        self._thread.join(self.timeout_s + 30)
        return self.results

    async def _run(self) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(timeout=self.timeout_s, limits=limits) as client:
            await asyncio.gather(*(self._client(client, k) for k in range(self.clients)))

    async def _client(self, client, k: int) -> None:
        import httpx

        i = 0
        while not self._stop.is_set():
            body = {"model": "coe", "messages": [{"role": "user", "content": QUERIES[(k + i) % len(QUERIES)]}],
                    "max_tokens": 1, "temperature": 0}
            t0 = time.monotonic()
            try:
                r = await client.post(self.url, json=body)
                outcome = str(r.status_code)
                if r.status_code == 500 and r.text == "Internal Server Error":
                    outcome = "500-proxy"  # Serve's proxy: the ingress replica died with the request
            except httpx.HTTPError as err:
                outcome = type(err).__name__
            self.results.append((t0, time.monotonic(), outcome))
            i += 1


def throughput(base: str, prefix: str, clients: int, seconds: float) -> float:
    """Successful routed requests/s over ``seconds`` of closed-loop load (after 1 s of ramp-up)."""
    load = Load(f"{base}{prefix}/v1/chat/completions", clients).start()
    time.sleep(1.0)
    t0 = time.monotonic()
    time.sleep(seconds)
    t1 = time.monotonic()
    results = load.stop()
    ok = [r for r in results if r[2] == "200" and t0 <= r[1] <= t1]
    bad = [r for r in results if r[2] != "200"]
    if bad:
        print(f"  {prefix or '/'}: {len(bad)} failed: {sorted({o for *_, o in bad})}", flush=True)
    return len(ok) / (t1 - t0)


# --------------------------------------------------------------------------- visibility


def visibility(base: str, root: Path, k: int, timeout_s: float = 30) -> tuple[float, float | None]:
    """(seconds from a registration's answer until the other ingress replica serves the expert,
    seconds until that replica last answered 404 for it, None if it was not asked before: then
    the first figure is how long Serve's proxy kept sending the requests to the first replica)."""
    import httpx

    eid = f"bench-physics-{k}"
    body = {"id": eid, "base": "tiny", "adapter": str(root / "adapters" / "c"),
            "description": "physics: gravity, forces, energy and motion", "examples": ["what is gravity ?"]}
    with httpx.Client(base_url=base, timeout=30) as c:
        r = c.post("/v1/experts", json=body, headers=AUTH)
        r.raise_for_status()
        t0, a = time.monotonic(), r.headers["x-coe-replica"]
        last_miss = None
        try:
            while time.monotonic() - t0 < timeout_s:
                p = c.post("/v1/chat/completions", json={"model": eid, "max_tokens": 1,
                                                          "messages": [{"role": "user", "content": "hello"}]})
                if p.headers.get("x-coe-replica") != a:
                    if p.status_code == 200:
                        return time.monotonic() - t0, last_miss
                    last_miss = time.monotonic() - t0
            raise SystemExit(f"{eid} not served by the other replica within {timeout_s} s")
        finally:
            c.delete(f"/v1/experts/{eid}", headers=AUTH).raise_for_status()


# --------------------------------------------------------------------------- node failure


def node_failure(local, base: str, clients: int, state: Path) -> dict:
    import httpx

    from coe.registry import ExpertRegistry
    from coe.tools.ray_local import LocalCluster

    def registered() -> set[str]:
        """The registry's experts, and every expert a few answers of /v1/models name."""
        served = set()
        for _ in range(6):
            served |= {m["id"] for m in httpx.get(f"{base}/v1/models", timeout=30).json()["data"]}
        return set(ExpertRegistry(state / "registry.sqlite").ids()) | served

    time.sleep(3)  # past registry_poll_s: the removals of the visibility phase reached every replica
    before = registered()
    load = Load(f"{base}/v1/chat/completions", clients).start()
    time.sleep(5)
    killing = time.monotonic()
    local.kill_worker(1)  # returns once every process of the node is gone
    killed = time.monotonic()
    survivor = local.node_id(0)
    replaced = None
    while time.monotonic() - killing < 240:
        placed = [LocalCluster.replica_nodes(d, app) for app in ("coe", "coe1") for d in ("coe-ingress", "expert-tiny")]
        if all(nodes and set(nodes) == {survivor} for nodes in placed) and \
                [len(n) for n in placed] == [2, 2, 1, 2]:
            replaced = time.monotonic() - killing
            break
        time.sleep(0.5)
    time.sleep(10)
    results = load.stop()
    end = time.monotonic()
    in_flight = [r for r in results if r[0] < killed and r[1] > killing]  # started before the node was gone
    failed = [r for r in results if r[2] != "200" and r[1] >= killing]
    last_failure = max((r[1] for r in failed), default=killing)
    outcomes: dict[str, int] = {}
    for *_, o in failed:
        outcomes[o] = outcomes.get(o, 0) + 1
    after = registered()
    return {
        "clients": clients,
        "requests_before_kill": sum(1 for r in results if r[1] < killing),
        "in_flight_at_kill": len(in_flight),
        "in_flight_failed": sum(1 for r in in_flight if r[2] != "200"),
        "failed_after_kill": len(failed),
        "failed_outcomes": outcomes,
        "kill_s": killed - killing,
        "failed_started_after_kill": sum(1 for r in failed if r[0] >= killed),
        "fail_fast_s": summary([r[1] - killing for r in failed]),
        "longest_in_flight_answer_s": max((r[1] - killing for r in in_flight), default=0.0),
        "replicas_replaced_s": replaced,
        "all_succeed_again_s": last_failure - killing,
        "succeeded_after_recovery": sum(1 for r in results if r[0] > last_failure and r[2] == "200"),
        "observed_until_s": end - killing,
        "registered_before": sorted(before),
        "registered_lost": sorted(before - after),
    }


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0, help="Load per variant per round.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--registrations", type=int, default=5)
    args = ap.parse_args()
    rec = RunRecord.start(note="Local multi-node Ray cluster (head + 2 worker nodes, loopback), tiny hf engine.")

    from coe.tools.k8s.local import deploy
    from coe.tools.ray_local import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="coe-scale-out-"))
    local = LocalCluster(workers=2, cpus_per_worker=2)
    try:
        root, state = work / "project", work / "state"
        state.mkdir(parents=True)
        tiny_project(root)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        serve_config = rendered(root, state, port)
        os.environ["COE_ADMIN_KEY"] = ADMIN
        t0 = time.monotonic()
        local.start()
        deploy(serve_config)
        wait_ready(base)
        startup_s = time.monotonic() - t0
        print(f"cluster up and both applications ready in {startup_s:.0f} s", flush=True)

        variants = {"1 ingress": "/one", "2 ingress": ""}
        for name, prefix in variants.items():  # warm-up round
            throughput(base, prefix, args.clients, 3)
        rps: dict[str, list[float]] = {n: [] for n in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % 2:] + names[: r % 2]:
                rps[name].append(throughput(base, variants[name], args.clients, args.seconds))
                print(f"round {r}: {name}: {rps[name][-1]:.1f} req/s", flush=True)

        samples = [visibility(base, root, k) for k in range(args.registrations)]
        vis = [v for v, _ in samples]
        misses = [m for _, m in samples]
        print(f"registration visibility: {samples} s", flush=True)

        failure = node_failure(local, base, args.clients, state)
        print(f"node failure: {failure}", flush=True)
    finally:
        local.stop()
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "setup": {"clients": args.clients, "seconds_per_variant": args.seconds, "rounds": args.rounds,
                  "engine": "hf, random 2-layer width-64 llama, max_tokens 1", "router": "centroid on minilm-l6-m2v",
                  "nodes": "head (0 CPUs) + 2 workers (2 logical CPUs each) on one 2-core machine",
                  "registry_poll_s": 2.0, "startup_s": startup_s},
        "routed_rps": {n: summary(v) for n, v in rps.items()},
        "routed_rps_rounds": rps,
        "ratio_2_over_1": paired_ratio(rps["2 ingress"], rps["1 ingress"]),
        "visibility_s": summary(vis),
        "visibility_samples_s": vis,
        "visibility_last_404_from_b_s": misses,
        "node_failure": failure,
    }
    data = rec.finish(results)
    f = failure
    md = rec.markdown_header("Scale-out on a local multi-node Ray cluster") + f"""\
Head + 2 worker nodes on this machine (loopback); the rendered `serveConfigV2` of a small
project (hf engine on a random 2-layer llama, `max_tokens` 1, centroid router on model2vec),
{args.clients} closed-loop clients through Serve's one HTTP proxy (on the head).

| | routed requests/s, median [min–max] (95% CI of the median) |
|---|---|
| 1 ingress replica | {fmt(results['routed_rps']['1 ingress'], digits=1)} ({results['routed_rps']['1 ingress']['ci'][0]:.1f}–{results['routed_rps']['1 ingress']['ci'][1]:.1f}) |
| 2 ingress replicas | {fmt(results['routed_rps']['2 ingress'], digits=1)} ({results['routed_rps']['2 ingress']['ci'][0]:.1f}–{results['routed_rps']['2 ingress']['ci'][1]:.1f}) |
| ratio 2 / 1 (per round) | {fmt(results['ratio_2_over_1'], digits=2)} |

{args.rounds} interleaved rounds of {args.seconds:.0f} s per variant. On 2 cores every process
(proxy, ingress replicas, expert replicas, raylets, this load generator) shares the same CPUs,
so a second ingress replica adds no CPU.

**Registration visibility** (registration answered by replica A → first 200 from replica B,
`serving.registry_poll_s` 2 s): median {statistics.median(vis):.2f} s, max {max(vis):.2f} s over
{len(vis)} registrations (samples {', '.join(f'{v:.2f}' for v in vis)} s). Replica B's last 404 for
the new expert came at {', '.join('-' if m is None else f'{m:.2f}' for m in misses)} s ('-': B was
not asked before it served it, so that sample also counts how long Serve's proxy kept choosing A).

**Node failure** ({f['clients']} clients; one worker node killed with its raylet, no grace):
{f['in_flight_at_kill']} requests in flight at the kill ({f['kill_s']:.1f} s to end the node's processes),
{f['in_flight_failed']} of them failed; {f['failed_after_kill']} requests failed in all
({f['failed_started_after_kill']} of them sent after the kill, to a replica Serve did not yet know
was dead), by outcome: {f['failed_outcomes']} (`503`: ours, an expert replica died; `500-proxy`:
Serve's proxy's bare 500 when the ingress replica itself died). Failed requests were answered
{fmt(f['fail_fast_s'], digits=2)} s after the kill began (median [min–max]); the longest in-flight
answer came {f['longest_in_flight_answer_s']:.1f} s after it.
Serve re-placed every replica on the surviving node after {f['replicas_replaced_s'] or float('nan'):.1f} s;
every request succeeded again {f['all_succeed_again_s']:.1f} s after the kill.
Registered experts lost: {f['registered_lost'] or 'none'}.
"""
    write_results("scale_out", data, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
