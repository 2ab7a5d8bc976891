"""Final answers: normalising an expert's reply, and the majority vote over several replies.

Used offline by ``coe eval --recruit`` (:mod:`coe.routers.recruit`) and meant for the service's
``aggregate: vote`` (several experts answer one query; the voted answer's best-ranked reply is
returned). No heavy imports.

Answer kinds (``KINDS``):

- ``choice``: a multiple-choice letter. ``"B"``, ``"(B)"``, ``"B)"``, ``"b."``, ``"Answer: B"``,
  ``"The answer is (B)"`` all give ``"B"``; a reply that names no single letter A–J gives None.
- ``number``: the final number (:func:`final_number`): the one after the last ``####``, else
  after "answer is", else the last number in the text; thousands separators, a leading ``$`` and
  trailing zeros of decimals are ignored (``"1,000"`` and ``"1000.0"`` both give ``"1000"``).
- ``text``: the reply with code fences, case and whitespace runs folded (``"Paris."`` and
  ``" paris"`` give ``"paris"``); an empty reply gives None.

:func:`vote` returns which reply wins: the answer given by most replies, ties going to the answer
whose best supporter ranks highest (e.g. by a router's predicted quality).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)


def normalize_number(text: str) -> str | None:
    """``"1,000.50"`` -> ``"1000.5"``, ``"-3"`` -> ``"-3"``; None when it is not a number."""
    s = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return str(int(value)) if value == int(value) else repr(value)


def final_number(text: str) -> str | None:
    """The final numeric answer of ``text`` (the ``number`` kind of the module docstring), normalized."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return normalize_number(found[0])
    marks = list(_ANSWER_IS.finditer(text))
    if marks:
        found = _NUMBER.findall(text[marks[-1].end():])
        if found:
            return normalize_number(found[0])
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


LOOP_TIMES, LOOP_MIN_CHARS = 3, 20


def looping(text: str, times: int = LOOP_TIMES, min_chars: int = LOOP_MIN_CHARS, max_chars: int = 400) -> bool:
    """True when ``text`` ends with one block of ``min_chars`` to ``max_chars`` characters written
    ``times`` times in a row: a greedy answer caught in a repetition loop, which greedy decoding
    keeps repeating. Costs at most ``max_chars`` slice comparisons."""
    n = len(text)
    for period in range(min_chars, min(max_chars, n // times) + 1):
        tail = text[n - period:]
        if all(text[n - (k + 1) * period:n - k * period] == tail for k in range(1, times)):
            return True
    return False


Kind = Literal["choice", "number", "text"]
KINDS: tuple[str, ...] = ("choice", "number", "text")

_LETTERS = "A-J"
# a reply that is only a letter, optionally bracketed or followed by ")", ".", ":"
_BARE = re.compile(rf"^\s*[\(\[]?\s*([{_LETTERS}])\s*[\)\]\.:]?\s*(?:$|\n)", re.IGNORECASE)
# "answer is (B)", "Answer: B", "correct option is B)" (the last such mention wins)
_STATED = re.compile(rf"(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*[\(\[]?([{_LETTERS}])\b(?![\w'])", re.IGNORECASE)
# a line "B) house" or "(B) house" that starts a reply naming the option with its text
_OPTION_LINE = re.compile(rf"^\s*[\(\[]?([{_LETTERS}])[\)\]]\s", re.IGNORECASE)
_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*")


def normalize_choice(text: str | None) -> str | None:
    """The option letter a reply gives (upper case), or None when it names none."""
    if not text:
        return None
    m = _BARE.match(text) or _OPTION_LINE.match(text)
    if m:
        return m.group(1).upper()
    stated = _STATED.findall(text)
    return stated[-1].upper() if stated else None


def normalize_text(text: str | None) -> str | None:
    """Case-, whitespace- and code-fence-folded text, trailing full stop dropped; None when empty."""
    if text is None:
        return None
    s = " ".join(_FENCE.sub(" ", text).split()).lower().rstrip(".").strip()
    return s or None


def normalize_answer(text: str | None, kind: Kind) -> str | None:
    """The normalised final answer of ``text`` as ``kind`` (see the module docstring), or None.

    Raises ValueError for an unknown kind."""
    if kind == "choice":
        return normalize_choice(text)
    if kind == "number":
        return final_number(text) if text else None
    if kind == "text":
        return normalize_text(text)
    raise ValueError(f"unknown answer kind {kind!r}; allowed: {', '.join(KINDS)}")


def vote(answers: Sequence[str | None], rank: Sequence[float]) -> int | None:
    """Index of the reply that represents the majority answer, or None when every reply abstains.

    ``answers``: the normalised answers (None abstains); ``rank``: one number per reply, higher
    is better (a router's predicted quality). The answer with the most votes wins; a tie goes to
    the answer whose best supporter has the highest rank, and the winner is represented by its
    highest-ranked supporter (the reply the service would return). Ties in ``rank`` go to the
    earlier reply."""
    if len(answers) != len(rank):
        raise ValueError(f"{len(answers)} answers but {len(rank)} ranks")
    count: dict[str, int] = {}
    best: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None:
            continue
        count[a] = count.get(a, 0) + 1
        if a not in best or rank[i] > rank[best[a]]:
            best[a] = i
    if not count:
        return None
    winner = max(count, key=lambda a: (count[a], rank[best[a]], -best[a]))
    return best[winner]
