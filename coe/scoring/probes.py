"""Probe sets: tasks with an automatic check, one JSON object per line (the native format).

A probe names its scorer and carries what that scorer needs::

    {"id": "mbpp/11", "query": "...", "category": "code", "scorer": "code_tests",
     "tests": ["assert f(1) == 2"], "test_setup": "", "reference": "```python\\n...\\n```"}

* ``exact_number``: ``answer`` is the gold final number (GSM8K style).
* ``code_tests``: ``tests`` holds at least one assert; ``test_setup`` runs before them.
* ``choice``: ``choices`` lists the options and ``answer`` is the correct one.
* ``reference_nll``: ``reference`` is the reference answer (every probe may carry one, so
  any probe can also be scored by likelihood).

:func:`load_probes` validates every line and raises :class:`~coe.errors.DatasetError` naming
the file and the line (unknown field, missing tests, unknown scorer...). Converters from the
raw MBPP and GSM8K files live here too, so training, evaluation and profiling render a task
the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from coe.errors import CoEError, DatasetError

ScorerName = Literal["exact_number", "code_tests", "choice", "reference_nll"]


class Probe(BaseModel):
    """One task. ``query`` is the user message sent to an expert (chat format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="unique id within the probe set")
    query: str = Field(min_length=1, description="the user message")
    scorer: ScorerName = Field(description="how an answer is checked")
    category: str | None = Field(default=None, description="domain label (math, code, ...)")
    answer: str | None = Field(default=None, description="gold answer (exact_number, choice)")
    reference: str | None = Field(default=None, description="reference answer text (reference_nll)")
    tests: list[str] = Field(default_factory=list, description="asserts (code_tests)")
    test_setup: str = Field(default="", description="code run before the asserts (code_tests)")
    choices: list[str] | None = Field(default=None, description="options (choice)")

    @model_validator(mode="after")
    def _needs(self) -> Probe:
        if self.scorer == "code_tests" and not [t for t in self.tests if t.strip()]:
            raise ValueError(f"task {self.id!r} has no tests: scorer 'code_tests' needs at least one assert in 'tests'")
        if self.scorer == "exact_number" and not (self.answer or "").strip():
            raise ValueError(f"task {self.id!r} has no 'answer': scorer 'exact_number' needs the gold number")
        if self.scorer == "choice":
            if not self.choices or len(self.choices) < 2:
                raise ValueError(f"task {self.id!r}: scorer 'choice' needs at least 2 'choices'")
            if self.answer not in self.choices:
                raise ValueError(f"task {self.id!r}: 'answer' must be one of its 'choices'")
        if self.scorer == "reference_nll" and not (self.reference or "").strip():
            raise ValueError(f"task {self.id!r} has no 'reference': scorer 'reference_nll' needs one")
        return self


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif loc:
            parts.append(f"{loc}: {err['msg']}")
        else:
            parts.append(err["msg"].removeprefix("Value error, "))
    return "; ".join(parts)


def _read_jsonl(path: Path):
    """Yield (line number, parsed object); DatasetError names the line of bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"probe file {path} does not exist")
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{path} line {n}: expected a JSON object")
            yield n, obj


def load_probes(path: str | Path) -> list[Probe]:
    """Every probe of a native JSONL probe file, validated; DatasetError names file and line.

    Allowed fields are those of :class:`Probe`; duplicate ids are refused too."""
    probes, seen = [], {}
    for n, obj in _read_jsonl(Path(path)):
        try:
            p = Probe.model_validate(obj)
        except ValidationError as exc:
            allowed = ", ".join(Probe.model_fields)
            raise DatasetError(f"{path} line {n}: {_describe(exc)} (allowed fields: {allowed})") from None
        if p.id in seen:
            raise DatasetError(f"{path} line {n}: duplicate id {p.id!r} (first on line {seen[p.id]})")
        seen[p.id] = n
        probes.append(p)
    return probes


def write_probes(probes: list[Probe], path: str | Path) -> None:
    """Write probes in the native format (fields left at their default are omitted)."""
    with Path(path).open("w") as f:
        f.writelines(json.dumps(p.model_dump(exclude_defaults=True)) + "\n" for p in probes)


# -- converters from the raw data sets -----------------------------------------------------

class _MbppRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task_id: str | int
    text: str
    code: str
    test_list: list[str]
    test_setup_code: str = ""
    challenge_test_list: list[str] = Field(default_factory=list)
    split: Literal["train", "validation", "test", "prompt"] | None = None


def mbpp_prompt(text: str, first_test: str) -> str:
    """MBPP's prompt: the task and its first assert (the text alone does not name the function)."""
    return f"{text.strip()}\nYour code should pass this test:\n{first_test.strip()}"


def code_block(code: str) -> str:
    """A reference solution as the experts answer: one fenced Python block."""
    code = code.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
    return f"```python\n{code}\n```"


def mbpp_probes(path: str | Path, split: str | None = None) -> list[Probe]:
    """MBPP tasks (raw ``mbpp.jsonl``) as ``code_tests`` probes, optionally one split only.

    DatasetError names the line of a row with unknown fields or without tests."""
    out = []
    for n, obj in _read_jsonl(Path(path)):
        try:
            row = _MbppRow.model_validate(obj)
        except ValidationError as exc:
            allowed = ", ".join(_MbppRow.model_fields)
            raise DatasetError(f"{path} line {n}: {_describe(exc)} (allowed fields: {allowed})") from None
        if split is not None and row.split != split:
            continue
        tid = str(row.task_id)
        tid = tid if tid.startswith("mbpp/") else f"mbpp/{tid}"
        if not row.test_list:
            raise DatasetError(f"{path} line {n}: task {tid!r} has no tests (test_list is empty)")
        out.append(Probe(
            id=tid, query=mbpp_prompt(row.text, row.test_list[0]), scorer="code_tests",
            category="code", tests=row.test_list, test_setup=row.test_setup_code,
            reference=code_block(row.code),
        ))
    return out


_CALC = re.compile(r"<<[^>]*>>")


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K's calculator annotations (``<<48/2=24>>``); keep the ``#### N`` line."""
    return _CALC.sub("", answer).strip()


def gsm8k_probe(pid: str, question: str, answer: str) -> Probe:
    """A GSM8K item (``question``, solution ending in ``#### N``) as an ``exact_number`` probe."""
    from coe.scoring.answers import final_number

    return Probe(id=pid, query=question.strip(), scorer="exact_number", category="math",
                 answer=final_number(answer), reference=clean_gsm8k_answer(answer))


def check_probe_file(path: str | Path) -> list:
    """Load a probe file (raises DatasetError naming the line); refuse an empty one."""
    probes = load_probes(path)
    if not probes:
        raise CoEError(f"{path}: no probes")
    return probes
