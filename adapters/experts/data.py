"""Training and held-out data for the LoRA experts (the team's shared data folder).

The split is fixed by file position, so it is reproducible without a stored index:

* GSM8K: ``training/gsm8k_train.jsonl``; the last ``holdout`` lines are held out.
* MBPP: ``routing/mbpp_train.csv`` trains, ``routing/mbpp_test.csv`` is held out. Both hold
  one prompt per row and, per model, a 0/1 correctness label and its answer.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
GSM8K = SHARED_DATA / "training" / "gsm8k_train.jsonl"
MBPP_TRAIN = SHARED_DATA / "routing" / "mbpp_train.csv"
MBPP_TEST = SHARED_DATA / "routing" / "mbpp_test.csv"
PREFERRED_CODER = "gpt-4-1106-preview"

_CALC = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K's calculator annotations (``<<48/2=24>>``); keep the ``#### N`` line."""
    return _CALC.sub("", answer)


def gsm8k_final(text: str) -> str | None:
    """The final numeric answer: after ``####`` if present, else the last number in the text."""
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    num = (found[0] if "####" in text else found[-1]).replace(",", "").rstrip(".")
    try:
        value = float(num)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


def _gsm8k_lines() -> list[dict]:
    with GSM8K.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def math_train(holdout: int) -> list[tuple[str, str]]:
    """(question, cleaned answer) pairs, all but the last ``holdout`` lines."""
    rows = _gsm8k_lines()[: -holdout or None]
    return [(r["question"], clean_gsm8k_answer(r["answer"])) for r in rows]


def math_heldout(holdout: int) -> list[tuple[str, str]]:
    """(question, gold final number) for the last ``holdout`` lines."""
    rows = _gsm8k_lines()[-holdout:]
    return [(r["question"], gsm8k_final(r["answer"])) for r in rows]


def _mbpp_pairs(path: Path) -> list[tuple[str, str]]:
    """(task prompt, a correct answer) for rows where some model's answer is labelled correct."""
    csv.field_size_limit(1 << 30)
    pairs = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            models = [k for k in row if f"{k}|model_response" in row]
            correct = [m for m in models if row[m] == "1.0"]
            if not correct:
                continue
            model = PREFERRED_CODER if PREFERRED_CODER in correct else correct[0]
            prompt = ast.literal_eval(row["prompt"])[0]
            answer = ast.literal_eval(row[f"{model}|model_response"])[0]
            pairs.append((prompt, answer))
    return pairs


def code_train() -> list[tuple[str, str]]:
    return _mbpp_pairs(MBPP_TRAIN)


def code_heldout() -> list[tuple[str, str]]:
    return _mbpp_pairs(MBPP_TEST)


def encode_example(tok, question: str, answer: str, max_len: int) -> tuple[list[int], int] | None:
    """Chat-formatted token ids and the number of trailing answer tokens (answer + ``<|im_end|>``).

    Returns None when the example does not fit in ``max_len`` tokens (it is skipped, not cut,
    so that no answer is trained without its end)."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer.strip() + tok.eos_token, add_special_tokens=False)["input_ids"]
    if len(p_ids) + len(a_ids) > max_len:
        return None
    return p_ids + a_ids, len(a_ids)
