"""The Ray that ``coe serve`` starts on this machine, and what it may see of the host.

* Loopback only: :func:`loopback_env` makes every Ray control port (GCS, raylet, object manager,
  dashboard agent, runtime-env agent, metrics export, autoscaler monitor, core workers) and
  vLLM's own sockets listen on 127.0.0.1. It must be in ``os.environ`` before ``import ray``
  (Ray reads it at import) and the processes Ray starts inherit it.
* No secrets in Ray: a local Ray's workers inherit this process's environment, so nothing is
  passed through Ray's runtime environment (which Ray writes to a world-readable log). For a
  remote cluster, :func:`forwarded_env` forwards a few non-secret settings; the admin and chat
  keys are never among them: the cluster's nodes must have them in their own environment.
* Nothing left behind: :class:`ProcessJanitor` makes this process the subreaper of everything
  it starts (processes orphaned by a dying replica come back to it) and, at stop, ends every
  descendant still running after Ray's own shutdown.
"""

from __future__ import annotations

import os
import sys

# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take 127.0.0.1 as the node address, and every
# Ray server binds to loopback when the node address is loopback. VLLM_HOST_IP is vLLM's.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_HOST_IP": "127.0.0.1"}
# non-secret settings a replica on another machine may need (never the admin or api key)
FORWARDED = ("COE_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_CPU_KVCACHE_SPACE")


def loopback_env() -> dict[str, str]:
    """The environment settings that keep a local Ray (and vLLM) on 127.0.0.1."""
    return dict(LOOPBACK)


def use_loopback() -> None:
    """Put :func:`loopback_env` into ``os.environ``. Call before ``import ray``; if Ray is
    already imported its cached flag is set too (the processes it starts read the environment)."""
    os.environ.update(LOOPBACK)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


SERVE_REPLICA_MODULE = "ray.serve._private.replica"
WORKER_HOOK = "coe.tools.ray_local.loopback_worker"


def loopback_worker() -> None:
    """Ray worker setup hook (``runtime_env={"worker_process_setup_hook": WORKER_HOOK}``).

    Serve replicas start their inter-deployment gRPC server on ``[::]:0`` whatever the node
    address is; in a loopback-only Ray this binds it to 127.0.0.1 instead (peers reach it at the
    node address, 127.0.0.1). The replica module is patched when it is first imported, so
    workers that never host a replica do not pay for importing Serve."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    module = sys.modules.get(SERVE_REPLICA_MODULE)
    if module is not None:
        _patch_replica(module)
    elif not any(isinstance(f, _ReplicaFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ReplicaFinder())


def _patch_replica(module) -> None:
    original = module.add_port_to_grpc_server
    if getattr(original, "coe_loopback", False):
        return

    def add_port_on_loopback(server, address: str):
        if address.startswith(("[::]:", "0.0.0.0:")):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port_on_loopback.coe_loopback = True
    module.add_port_to_grpc_server = add_port_on_loopback


class _ReplicaFinder:
    """Meta-path finder that patches the Serve replica module right after it is executed."""

    def find_spec(self, name, path=None, target=None):
        if name != SERVE_REPLICA_MODULE:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch_replica(module)

        loader.exec_module = exec_and_patch
        return spec


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for replicas on a cluster that does not inherit this process's environment:
    only :data:`FORWARDED` names, never a secret."""
    env = os.environ if environ is None else environ
    return {n: env[n] for n in FORWARDED if n in env}


class ProcessJanitor:
    """Tracks and ends the processes this one starts (Linux; elsewhere only direct descendants).

    ``start()`` makes this process a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``), so
    grandchildren orphaned while serving (a vLLM engine whose replica was killed) are re-parented
    here instead of to init and stay findable. ``stop()`` waits for descendants to exit on their
    own, then sends SIGTERM, then SIGKILL, and reaps them. Not thread-safe; call from the main
    thread."""

    def __init__(self) -> None:
        self.subreaper = False

    def start(self) -> bool:
        """Become the subreaper of our descendants; False where the OS does not support it."""
        if not sys.platform.startswith("linux"):
            return False
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.subreaper = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            self.subreaper = False
        return self.subreaper

    @staticmethod
    def descendants() -> list:
        """The live descendants of this process (``psutil.Process`` objects)."""
        import psutil

        try:
            return [p for p in psutil.Process().children(recursive=True) if p.is_running()]
        except psutil.Error:
            return []

    @staticmethod
    def children() -> set[int]:
        """Pids of this process's direct children."""
        import psutil

        try:
            return {p.pid for p in psutil.Process().children()}
        except psutil.Error:
            return set()

    def end_orphans(self, known: set[int], *, term_s: float = 5.0) -> list[int]:
        """End direct children not in ``known`` (the processes started on purpose, e.g. Ray's
        GCS and raylet): with the subreaper set, such a child is an orphan whose parent died
        (an engine process of a killed replica) and would hold its memory until the stop.
        Returns their pids."""
        import psutil

        if not self.subreaper:
            return []
        strays = [p for p in psutil.Process().children() if p.pid not in known]
        _terminate(strays, term_s)
        return [p.pid for p in strays]

    def stop(self, *, grace_s: float = 10.0, term_s: float = 5.0) -> list[int]:
        """End every descendant still running: wait ``grace_s`` for them to exit, SIGTERM the
        rest, wait ``term_s``, SIGKILL what is left. Returns the pids that had to be signalled."""
        import psutil

        procs = self.descendants()
        if not procs:
            return []
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        signalled = [p.pid for p in alive]
        _terminate(alive, term_s)
        # orphans that appeared while we waited (children of the ones just ended)
        late = self.descendants()
        _signal(late, "kill")
        psutil.wait_procs(late, timeout=term_s)
        return signalled + [p.pid for p in late]


def _signal(procs: list, how: str) -> None:
    """``p.terminate()`` / ``p.kill()`` on each process, ignoring those already gone."""
    import psutil

    for p in procs:
        try:
            getattr(p, how)()
        except psutil.Error:
            pass


def _terminate(procs: list, term_s: float) -> None:
    """SIGTERM ``procs``, wait ``term_s``, SIGKILL what is left and reap it."""
    import psutil

    _signal(procs, "terminate")
    _, alive = psutil.wait_procs(procs, timeout=term_s)
    _signal(alive, "kill")
    psutil.wait_procs(alive, timeout=term_s)


class LocalCluster:
    """A multi-node Ray cluster on this machine, loopback only: a head that runs no replicas
    (``num_cpus: 0``, as the KubeRay head) and ``workers`` worker nodes, each its own raylet,
    built with ``ray.cluster_utils.Cluster`` as Ray's own tests build theirs. For tests and
    benchmarks of what a cluster does (replica placement, node failure), not for serving.

    Workers inherit this process's environment (set secrets such as the admin key in
    ``os.environ`` before :meth:`start`; nothing goes through a runtime env)."""

    def __init__(self, workers: int = 2, cpus_per_worker: float = 2.0) -> None:
        self.n_workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.cluster = None
        self.workers: list = []

    def start(self) -> LocalCluster:
        use_loopback()
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        self.workers = [self.cluster.add_node(num_cpus=self.cpus_per_worker) for _ in range(self.n_workers)]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": WORKER_HOOK})
        return self

    def node_id(self, worker: int) -> str:
        return self.workers[worker].node_id

    def kill_worker(self, worker: int) -> None:
        """Kill a worker node's raylet and every process of that node at once (no grace)."""
        node = self.workers.pop(worker)
        self.cluster.remove_node(node, allow_graceful=False)

    @staticmethod
    def replica_nodes(deployment: str, app: str = "coe") -> list[str]:
        """Node ids of the live replicas of ``deployment`` (from the GCS actor table)."""
        from ray._private.state import actors

        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        return [a["Address"]["NodeID"] for a in actors().values()
                if a.get("Name", "").startswith(prefix) and a.get("State") == "ALIVE"]

    def stop(self) -> None:
        """Serve, the driver's connection and every node's processes."""
        import ray

        try:
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()
                self.cluster = None
