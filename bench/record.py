"""The results header every benchmark records, and the one writer of ``bench/results/<name>.*``.

A figure is only worth quoting with the conditions it was taken under (STYLE 18), so every
results file carries the same header, the way an artifact appendix would:

- ``command``: the exact command line (interpreter, script, arguments) and the working folder;
- ``git``: the commit and whether the tree had uncommitted changes;
- ``machine``: CPU model and count, platform, Python, torch (version, intra-op threads, CUDA
  device when present) and the thread-related environment (``OMP_NUM_THREADS``, ...);
- ``started`` / ``finished`` (UTC) and the wall time;
- ``load_before`` / ``load_after``: the 1/5/15-minute load averages read when the run *started*
  (:meth:`RunRecord.start`) and when it *finished* (:meth:`RunRecord.finish`). A run under
  ``../shared/tools/quiet-run`` also gets that tool's QUIET/CONTENDED line in
  ``bench/results/quiet-run.log``.

Usage::

    rec = RunRecord.start(note="...")          # first thing in main(), before any heavy work
    ...                                         # the benchmark
    write_results("name", rec.finish({...}), rec.markdown_header("Title") + body)

or, for a benchmark that compares its arms and renders its own markdown,
``conclude(rec, "name", "Title", results, compare=compare, markdown=markdown)``.

No torch import here unless torch is already imported (the header reports it then); no side
effects at import time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "CUDA_VISIBLE_DEVICES")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' when unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran this process, quoted so it can be pasted back into a shell."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0] == "-m":  # pragma: no cover - python -m keeps "-m" in argv[0] briefly
        argv = argv[1:]
    exe = os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd()) else sys.executable
    flags = [f for f, on in (("-S", sys.flags.no_site), ("-I", sys.flags.isolated)) if on]
    return shlex.join([exe, *flags, *argv])


def git_state() -> dict:
    """``{"commit": sha, "dirty": bool}``; empty when not in a git checkout (e.g. a GPU machine)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               check=False, cwd=REPO,
                               capture_output=True, text=True, timeout=10)
        return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}


def machine_info() -> dict:
    """What the figures were measured on. Reports torch only when it is already imported."""
    info = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = bool(torch.cuda.is_available())
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    for lib in ("transformers", "peft", "vllm"):
        mod = sys.modules.get(lib)
        if mod is not None:
            info[lib] = getattr(mod, "__version__", "?")
    return info


@dataclass
class RunRecord:
    """Conditions of one benchmark run: start with :meth:`start`, close with :meth:`finish`."""

    command: str
    cwd: str
    started: str
    load_before: list[float]
    git: dict = field(default_factory=dict)
    note: str = ""
    finished: str | None = None
    load_after: list[float] | None = None
    wall_s: float | None = None
    machine: dict = field(default_factory=dict)
    _t0: float = field(default=0.0, repr=False)

    @classmethod
    def start(cls, note: str = "", argv: list[str] | None = None) -> RunRecord:
        """Read the load average and the clock now, at the start of the run."""
        return cls(command=command_line(argv), cwd=os.getcwd(), started=_now(), load_before=_load(),
                   git=git_state(), note=note, _t0=time.monotonic())

    def finish(self, results: dict | None = None) -> dict:
        """Read the load and clock at the end; returns ``{"run": header, **results}``.

        The machine is read here too, so the torch threads and versions the run used are in it.
        """
        self.finished, self.load_after = _now(), _load()
        self.wall_s = round(time.monotonic() - self._t0, 1)
        self.machine = machine_info()
        return {"run": self.header(), **(results or {})}

    def header(self) -> dict:
        d = asdict(self)
        d.pop("_t0")
        return d

    def markdown_header(self, title: str) -> str:
        """``# title`` and one paragraph: date, machine, load before/after, command."""
        m = self.machine or machine_info()
        torch = f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else ""
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        env = "".join(f", {k}={v}" for k, v in m.get("thread_env", {}).items())
        commit = self.git.get("commit", "")[:10] + (" (uncommitted changes)" if self.git.get("dirty") else "")
        return (
            f"# {title}\n\n"
            f"Run {self.started} → {self.finished or '…'} ({self.wall_s or 0:.0f} s) on {m['cpus']} × "
            f"{m['cpu'] or 'CPU'}{gpu}, {m['platform']}, Python {m['python']}{torch}{env}. "
            f"Load average (1/5/15 min) before {_fmt_load(self.load_before)}, after {_fmt_load(self.load_after)}. "
            f"{'Commit ' + commit + '. ' if commit else ''}{self.note + ' ' if self.note else ''}\n\n"
            f"Command: `{self.command}`\n\n"
        )


def conclude(rec: RunRecord, name: str, title: str, results: dict, *,
             compare: Callable[[dict], dict], markdown: Callable[[dict, dict], str]) -> dict:
    """The end of a benchmark's ``main``: ``results["comparison"] = compare(results)``, the body
    ``markdown(results, comparison)``, ``rec`` finished, ``<name>.json``/``.md`` written (under the
    header ``# title``) and the body printed. Returns the data written (``{"run": header, **results}``)."""
    results["comparison"] = comparison = compare(results)
    body = markdown(results, comparison)
    data = rec.finish(results)
    write_results(name, data, rec.markdown_header(title) + body)
    print(body)
    return data


def _fmt_load(xs: list[float] | None) -> str:
    return "/".join(f"{x:.2f}" for x in xs) if xs else "n/a"


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def write_results(name: str, data: dict, markdown: str, folder: Path | None = None) -> tuple[Path, Path]:
    """Write ``<folder>/<name>.json`` and ``.md``; returns both paths.

    The default folder is ``$COE_BENCH_RESULTS`` when set (the GPU check points it at ``$OUT``),
    else ``bench/results``.
    """
    folder = Path(folder or os.environ.get("COE_BENCH_RESULTS") or RESULTS)
    js, md = folder / f"{name}.json", folder / f"{name}.md"
    js.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    md.write_text(markdown.rstrip() + "\n")
    return js, md
