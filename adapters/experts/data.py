"""Training and held-out data for the LoRA experts (the team's shared data folder).

Every split is fixed, so it is reproducible without a stored index:

* math trains on GSM8K train (``training/gsm8k_train.jsonl``) except its last ``holdout``
  lines. Held out: those last lines (with GSM8K's own reference solutions: reference NLL and
  accuracy) and the GSM8K *test* questions of ``routing/routellm_gsm8k_responses.csv`` (no
  reference solution there: the gold number is that of a response the file judges correct,
  GPT-4's first; questions with no correct response are skipped).
* code trains on MBPP's ``train`` split of ``probes/mbpp.jsonl`` and is held out on its
  ``test`` split (asserts run by the ``code_tests`` scorer).

Examples are chat-formatted with the model's own template (default system prompt included,
as the engines render it); the answer is GSM8K's solution (calculator annotations dropped,
``#### N`` kept) or the MBPP reference code in one fenced Python block.
"""

from __future__ import annotations

import csv
from pathlib import Path

from coe.scoring.probes import Probe, gsm8k_probe, mbpp_probes

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GSM8K = SHARED_DATA / "training" / "gsm8k_train.jsonl"
GSM8K_TEST = SHARED_DATA / "routing" / "routellm_gsm8k_responses.csv"
MBPP = SHARED_DATA / "probes" / "mbpp.jsonl"
GSM8K_JUDGED = ("gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1")


def _gsm8k_probes() -> list[Probe]:
    import json

    with GSM8K.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [gsm8k_probe(f"gsm8k-train/{i}", r["question"], r["answer"]) for i, r in enumerate(rows)]


def math_train(holdout: int) -> list[Probe]:
    """GSM8K train items except the last ``holdout``."""
    return _gsm8k_probes()[: -holdout or None]


def math_heldout(holdout: int) -> list[Probe]:
    """The last ``holdout`` GSM8K train items (never trained on), with reference solutions."""
    return _gsm8k_probes()[-holdout:]


def math_test() -> list[Probe]:
    """GSM8K test questions with a gold number taken from a response judged correct."""
    from coe.scoring.answers import final_number

    csv.field_size_limit(1 << 30)
    out = []
    with GSM8K_TEST.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            gold = next((final_number(row[f"{m}_response"]) for m in GSM8K_JUDGED if row[m] == "True"), None)
            if gold is not None:
                out.append(Probe(id=f"gsm8k-test/{i}", query=row["prompt"].strip(), scorer="exact_number",
                                 category="math", answer=gold))
    return out


def code_train() -> list[Probe]:
    return mbpp_probes(MBPP, "train")


def code_heldout() -> list[Probe]:
    return mbpp_probes(MBPP, "test")


def chat_prompt(tok, query: str) -> str:
    """The rendered chat prompt of one user message, ready for the assistant's answer."""
    return tok.apply_chat_template([{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False)


def encode_example(tok, question: str, answer: str, max_len: int) -> tuple[list[int], int] | None:
    """:func:`coe.scoring.likelihood.encode_chat`, or None when the example does not fit in
    ``max_len`` tokens (it is skipped, not cut, so that no answer is trained without its end)."""
    from coe.scoring.likelihood import encode_chat

    ids, n = encode_chat(tok, question, answer)
    return (ids, n) if len(ids) <= max_len else None
