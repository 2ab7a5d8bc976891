"""``code_tests``: run the answer's code followed by the probe's setup and asserts.

The code is the first fenced block of the answer that defines something (```` ```python ````
or a bare fence), else the first fenced block, else the whole answer. It runs in
:func:`coe.scoring.sandbox.run_python` (a separate confined process: wall-clock, memory and
file-size limits, no network, a scratch folder; see there), never in the calling process.
It passes when the process exits cleanly *and* reaches a marker printed after the last assert
(so code that calls ``exit()`` early does not pass)."""

from __future__ import annotations

import re
import secrets
from typing import Any

from coe.scoring.base import Outcome, register_scorer
from coe.scoring.probes import Probe

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)   # an unclosed last block runs to the end
_PYTHON = ("", "python", "py", "python3")
_DEFINES = re.compile(r"^\s*(def|class|import|from)\s", re.MULTILINE)


def extract_code(answer: str) -> str:
    """The code of an answer (rules in the module docstring)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    py = [b for lang, b in blocks if lang in _PYTHON]
    for body in py or [b for _, b in blocks]:
        if _DEFINES.search(body):
            return body
    if blocks:
        return (py or [b for _, b in blocks])[0]
    return answer


def code_settled(prefix: str) -> bool:
    """True when :func:`extract_code` gives the same code for ``prefix`` and for every text that
    starts with it: ``prefix`` holds a *closed* Python (or bare) fenced block that defines
    something. Such a block is the first defining Python block of any continuation: the blocks
    closed within ``prefix`` are the first blocks of every continuation, unchanged (each ends at
    the first closing fence after its opening line), and a Python block wins over other languages
    and over later blocks. A defining block in another language never settles (a later Python
    block would win); nor does an unclosed one (it grows)."""
    for m in _FENCE.finditer(prefix):
        if m.end(2) == m.end():   # ran to the end of the prefix: not closed yet (and the last block)
            return False
        if m.group(1).lower() in _PYTHON and _DEFINES.search(m.group(2)):
            return True
    return False


@register_scorer("code_tests")
class CodeTests:
    """1 when every assert passes within the limits; else 0 with the first error as the reason."""

    higher_is_better = True

    def __init__(self, timeout_s: float = 10.0, memory_mb: int = 512) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def __call__(self, probe: Probe, answer: str | None, **context: Any) -> Outcome:
        from coe.scoring.sandbox import run_python

        if not probe.tests:
            return Outcome.failed(f"task {probe.id!r} has no tests")
        code = extract_code(answer or "")
        if not code.strip():
            return Outcome.failed("no code in the answer")
        marker = f"coe-tests-passed-{secrets.token_hex(8)}"
        program = "\n\n".join([code, probe.test_setup, "\n".join(probe.tests), f"print({marker!r})"])
        res = run_python(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        detail = {"wall_s": round(res.wall_s, 3), **res.enforced}
        if res.ok and marker in res.stdout:
            return Outcome(1.0, True, None, detail)
        reason = res.reason or "the program exited before the last assert"
        return Outcome(0.0, False, reason, detail)

    def settled(self, probe: Probe, prefix: str) -> bool:
        """:func:`code_settled`: the code that would run can no longer change."""
        return code_settled(prefix)
