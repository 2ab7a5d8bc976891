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

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(answer: str) -> str:
    """The code of an answer (rules in the module docstring)."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer)]
    py = [b for lang, b in blocks if lang in ("", "python", "py", "python3")]
    for body in py or [b for _, b in blocks]:
        if re.search(r"^\s*(def|class|import|from)\s", body, re.MULTILINE):
            return body
    if blocks:
        return (py or [b for _, b in blocks])[0]
    return answer


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
