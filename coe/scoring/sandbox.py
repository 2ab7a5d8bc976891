"""Run untrusted Python (generated code plus its asserts) in a separate, confined process.

:func:`run_python` never runs the code in the calling process. What is enforced:

* a separate process in its own session/process group, killed as a group (``SIGKILL``) at the
  wall-clock limit and again after it exits, so processes it forked die with it;
* ``RLIMIT_AS`` (address space; unbounded allocation ends in ``MemoryError``), ``RLIMIT_CPU``,
  ``RLIMIT_FSIZE`` (no file, stdout/stderr included, over ``max_file_bytes``), ``RLIMIT_CORE`` 0;
* the scratch directory (a fresh temporary folder, removed afterwards) is the cwd, ``HOME`` and
  ``TMPDIR``; the interpreter runs isolated (``-I``: no user site, ``PYTHON*`` variables ignored);
* no network: a new, empty network namespace (``unshare(CLONE_NEWNET)``, or with
  ``CLONE_NEWUSER`` where unprivileged user namespaces are allowed); where neither is allowed,
  only the audit hook below blocks sockets (recorded as ``network: "audit-hook"``);
* when started as root and ``nobody`` can read the interpreter: the code runs as ``nobody`` (so it cannot write files owned by
  others) with ``RLIMIT_NPROC`` bounding forks; otherwise ``os.fork`` is refused;
* an audit hook (best effort: Python audit hooks are not a security boundary against code that
  reaches native calls, which is why ``ctypes`` loading is refused too) that refuses writes,
  renames and deletions outside the scratch folder, sockets, ``subprocess``/``exec``/``spawn``/
  ``os.system``, and ``ctypes`` library loading.

For hostile code in production, run the scorer inside a container or VM as well.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NOBODY = 65534

# Runs first in the child: confine, then run the program as __main__. argv: scratch, program,
# mem bytes, cpu seconds, file bytes, nproc, drop to nobody (0/1).
_BOOT = r'''
import ctypes, os, resource, sys
scratch, prog, mem, cpu, fsize, nproc, drop = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
net = "none"
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) == 0:
    net = "netns"
elif libc.unshare(0x10000000 | 0x40000000) == 0:
    net = "userns+netns"
del libc
for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
root = bool(drop)
if root:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.chdir(scratch)
sys.stderr.write(f"#sandbox network={net} user={os.geteuid()}\n"); sys.stderr.flush()
_real = os.path.realpath
_scratch = _real(scratch) + os.sep
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
    "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.copymode",
    "shutil.copystat", "shutil.move", "shutil.chown", "os.chdir", "os.chroot", "os.mkfifo", "os.mknod"}
_DENY = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.", "os.kill", "os.killpg", "signal.pthread_kill",
    "sys.remote_exec", "os.setuid", "os.setgid")
if not root:
    _DENY = _DENY + ("os.fork", "os.forkpty")
def _inside(p):
    if isinstance(p, int):
        return True
    try:
        p = os.fsdecode(p)
    except TypeError:
        return True
    return p in ("/dev/null",) or _real(p).startswith(_scratch) or _real(p) + os.sep == _scratch
def _hook(event, args):
    if event.startswith(_DENY):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open" and len(args) >= 3:
        path, mode, flags = args[0], args[1], args[2]
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _W)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the scratch folder is not allowed")
    elif event in _PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} on {a!r} outside the scratch folder is not allowed")
sys.addaudithook(_hook)
del ctypes, resource
import runpy
sys.argv = [prog]
runpy.run_path(prog, run_name="__main__")
'''


@dataclass(frozen=True)
class SandboxResult:
    """``ok``: exit status 0 within the limits. ``reason``: why not (None when ok)."""

    ok: bool
    returncode: int | None
    reason: str | None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    enforced: dict = field(default_factory=dict)


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _failure(rc: int, stderr: str, mem: int) -> str:
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        hint = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed",
                "SIGSEGV": "crashed"}.get(sig, "killed by a signal")
        return f"{hint} ({sig})"
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("#sandbox")]
    last = lines[-1].strip() if lines else f"exit status {rc}"
    if last.startswith("MemoryError"):
        return f"memory limit ({mem // 2**20} MiB): {last}"
    return last[:300]


def run_python(code: str, *, timeout_s: float = 10.0, memory_mb: int = 512, max_file_bytes: int = 1 << 20,
               max_procs: int = 64) -> SandboxResult:
    """Run ``code`` as a Python script under the confinement described in the module docstring.

    Returns a :class:`SandboxResult`; never raises for anything the code does. Thread-safe
    (each call has its own scratch folder and process group)."""
    scratch = Path(tempfile.mkdtemp(prefix="coe-sandbox-"))
    root = _can_drop_to_nobody()
    try:
        prog = scratch / "main.py"
        prog.write_text(code)
        out_f, err_f = scratch / ".stdout", scratch / ".stderr"
        if root:
            for p in (scratch, prog):
                os.chown(p, NOBODY, NOBODY)
        env = {"HOME": str(scratch), "TMPDIR": str(scratch), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        cmd = [sys.executable, "-I", "-c", _BOOT, str(scratch), str(prog), str(memory_mb << 20),
               str(int(timeout_s) + 1), str(max_file_bytes), str(max_procs), str(int(root))]
        t0 = time.monotonic()
        with out_f.open("wb") as out, err_f.open("wb") as err:
            proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # also after a normal exit: forked children die with it
            proc.wait()
        wall = time.monotonic() - t0
        stdout, stderr = _tail(out_f), _tail(err_f)
        net = next((ln.split("network=")[1].split()[0] for ln in stderr.splitlines() if ln.startswith("#sandbox")), "?")
        enforced = {"network": net if net != "none" else "audit-hook", "user": "nobody" if root else "caller",
                    "memory_mb": memory_mb, "timeout_s": timeout_s}
        stderr = "\n".join(ln for ln in stderr.splitlines() if not ln.startswith("#sandbox"))
        if timed_out:
            return SandboxResult(False, None, f"timed out after {timeout_s:g} s (process group killed)",
                                 stdout, stderr, wall, enforced)
        rc = proc.returncode
        if rc == 0:
            return SandboxResult(True, 0, None, stdout, stderr, wall, enforced)
        return SandboxResult(False, rc, _failure(rc, stderr, memory_mb << 20), stdout, stderr, wall, enforced)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@functools.cache
def _can_drop_to_nobody() -> bool:
    """Root, and user ``nobody`` can read this interpreter's standard library (not so when
    Python lives under a private home folder)."""
    import sysconfig

    if os.geteuid() != 0:
        return False
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    exe = Path(sys.executable).resolve()
    for p in [*stdlib.parents, *exe.parents]:
        if not p.stat().st_mode & 0o001:
            return False
    return bool(stdlib.stat().st_mode & 0o005 == 0o005 and exe.stat().st_mode & 0o005 == 0o005)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
