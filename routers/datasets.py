"""Routing datasets: per query, every model's outcome (quality) and, where known, cost.

Formats read by :func:`load_routing_data` (``fmt="auto"`` picks by extension and header):

- ``routerbench`` — RouterBench's wide CSV: ``prompt``, one column per model with the outcome,
  ``<model>|total_cost`` (USD per query), optionally ``<model>|model_response``, ``eval_name``,
  ``oracle_model_to_route_to``. Prompts stored as a Python list literal (``"['...']"``) are
  unwrapped, and so are the replies (kept as ``RoutingData.responses``).
- ``routellm`` — RouteLLM's CSV: ``prompt`` and one boolean/number column per model (columns
  ending in ``_response`` are the replies, kept as ``responses`` when every model has one). Any
  wide CSV with a ``prompt`` column reads this way.
- ``scores`` — JSON (a list) or JSONL of ``{"question": str, "scores": {model: score}}``.
- ``native`` — JSONL, one query per line::

      {"query": "text", "outcomes": {"model-a": 1.0, "model-b": 0.0},
       "costs": {"model-a": 0.002, "model-b": 0.0001}, "category": "math", "id": "optional"}

  ``outcomes`` are qualities (any scale; 0..1 for correctness); ``costs`` and ``category``
  (a label the ``category`` router can learn) are optional.
- ``mtbench`` — MT-Bench judgements JSONL (RouteLLM's ``judgements.jsonl``: ``question_id``,
  ``model``, ``turn``, ``score`` 1–10) with the questions file beside it
  (``mt_bench_questions.jsonl`` or ``question.jsonl``: ``question_id``, ``category``, ``turns``).
  One row per (question, turn): the query is the user turns up to that turn, the quality the
  judge's score (1–10), the category MT-Bench's.

A row with a missing or non-numeric outcome for any model, or an empty query, is skipped and
counted (``RoutingData.skipped``). A file that cannot be parsed at all raises
:class:`DatasetError` naming the file and line. A per-model cost table (``--costs``: JSON/YAML
mapping or a ``model,cost`` CSV) replaces or supplies costs; without any cost every model
costs 1.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coe.errors import DatasetError

FORMATS = ("auto", "routerbench", "routellm", "scores", "native", "mtbench")
_META_COLUMNS = {"", "sample_id", "prompt", "eval_name", "oracle_model_to_route_to", "question", "id"}
_TRUE = {"true", "yes"}
_FALSE = {"false", "no"}


@dataclass
class RoutingData:
    """``quality[i, j]``: outcome of ``models[j]`` on ``queries[i]``; ``cost`` likewise or ``None``."""

    queries: list[str]
    models: list[str]
    quality: np.ndarray                    # [N, M] float64
    cost: np.ndarray | None = None         # [N, M] float64, per-query cost
    source: str = ""
    skipped: Counter = field(default_factory=Counter)
    categories: list[str] | None = None    # per query (RouterBench eval_name, native "category")
    # [N, M] bool: which outcomes were measured (None: all). Loaders keep only complete rows; a
    # profile of a new expert on a few queries is partial, and the ``irt`` router fits on the mask.
    observed: np.ndarray | None = None
    # [N, M] object: each model's reply text (None: not recorded), from RouterBench's
    # ``<model>|model_response`` or RouteLLM's ``<model>_response``; ``coe eval --recruit`` votes on them.
    responses: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.queries)

    def mean_costs(self) -> np.ndarray:
        """Mean cost per model ``[M]`` (ones when the data carries no costs)."""
        if self.cost is None:
            return np.ones(len(self.models))
        return self.cost.mean(axis=0)

    def costs_or_ones(self) -> np.ndarray:
        return self.cost if self.cost is not None else np.ones_like(self.quality)

    def subset(self, idx) -> RoutingData:
        idx = np.asarray(idx)
        return RoutingData(
            queries=[self.queries[i] for i in idx],
            models=list(self.models),
            quality=self.quality[idx],
            cost=None if self.cost is None else self.cost[idx],
            source=self.source,
            skipped=Counter(),
            categories=None if self.categories is None else [self.categories[i] for i in idx],
            observed=None if self.observed is None else self.observed[idx],
            responses=None if self.responses is None else self.responses[idx],
        )

    def with_cost_table(self, table: dict[str, float]) -> RoutingData:
        missing = [m for m in self.models if m not in table]
        if missing:
            raise DatasetError(f"cost table has no cost for models: {', '.join(missing)}")
        row = np.array([float(table[m]) for m in self.models])
        return RoutingData(
            self.queries, self.models, self.quality, np.tile(row, (len(self), 1)), self.source, self.skipped,
            self.categories, self.observed, self.responses,
        )

    def reordered(self, models: list[str]) -> RoutingData:
        """The same data with columns in ``models`` order (which must be the same set)."""
        check_same_models(models, self.models, "train", "test")
        idx = [self.models.index(m) for m in models]
        return RoutingData(
            self.queries, list(models), self.quality[:, idx],
            None if self.cost is None else self.cost[:, idx], self.source, self.skipped, self.categories,
            None if self.observed is None else self.observed[:, idx],
            None if self.responses is None else self.responses[:, idx],
        )


def check_same_models(train: list[str], test: list[str], a: str = "train", b: str = "test") -> None:
    """Raise :class:`DatasetError` naming the models only one side has."""
    only_a, only_b = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"only in {a}: {', '.join(only_a)}")
        if only_b:
            parts.append(f"only in {b}: {', '.join(only_b)}")
        raise DatasetError(f"the {a} and {b} sets have different models ({'; '.join(parts)})")


def _outcome(value) -> float | None:
    """A quality value, or None when missing or not a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return None if math.isnan(value) else float(value)
    text = str(value).strip().lower()
    if text in ("", "nan", "none", "null"):
        return None
    if text in _TRUE:
        return 1.0
    if text in _FALSE:
        return 0.0
    try:
        v = float(text)
    except ValueError:
        return None
    return None if math.isnan(v) else v


def _reply(text: str) -> str | None:
    """A model's reply as the CSV records it (RouterBench wraps it in a list literal); None when empty."""
    return _unwrap_prompt(text) if text.strip() else None


def _unwrap_prompt(text: str) -> str:
    """RouterBench stores prompts as a Python list literal; return the text inside."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        try:
            value = ast.literal_eval(t)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
    return text


class _Builder:
    def __init__(self, source: str, models: list[str]) -> None:
        self.source, self.models = source, models
        self.queries: list[str] = []
        self.quality: list[list[float]] = []
        self.cost: list[list[float]] = []
        self.has_cost = False
        self.skipped: Counter = Counter()
        self.categories: list[str] = []
        self.responses: list[list[str | None]] = []

    def add(self, query, outcomes: dict, costs: dict | None, category: str | None = None,
            responses: dict | None = None) -> None:
        if not isinstance(query, str) or not query.strip():
            self.skipped["empty query"] += 1
            return
        q = [_outcome(outcomes.get(m)) for m in self.models]
        if any(v is None for v in q):
            raw = [outcomes.get(m) for m, v in zip(self.models, q) if v is None]
            missing = all(r is None or str(r).strip().lower() in ("", "nan", "none", "null") for r in raw)
            self.skipped["missing outcome" if missing else "unparseable outcome"] += 1
            return
        c = None
        if costs is not None:
            c = [_outcome(costs.get(m)) for m in self.models]
            if any(v is None for v in c):
                self.skipped["missing cost"] += 1
                return
        self.queries.append(query)
        self.categories.append("" if category is None else str(category))
        self.quality.append(q)  # type: ignore[arg-type]
        if responses is not None:
            self.responses.append([responses.get(m) for m in self.models])
        if c is not None:
            self.cost.append(c)  # type: ignore[arg-type]
            self.has_cost = True

    def build(self) -> RoutingData:
        if not self.queries:
            detail = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "no rows"
            raise DatasetError(f"{self.source}: no usable rows ({detail})")
        return RoutingData(
            queries=self.queries,
            models=self.models,
            quality=np.asarray(self.quality, dtype=np.float64),
            cost=np.asarray(self.cost, dtype=np.float64) if self.has_cost else None,
            source=self.source,
            skipped=self.skipped,
            categories=self.categories if any(self.categories) else None,
            responses=_object_array(self.responses) if len(self.responses) == len(self.queries) else None,
        )


def _object_array(rows: list[list[str | None]]) -> np.ndarray:
    out = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        out[i, :] = row
    return out


def _read_csv(path: Path, fmt: str) -> RoutingData:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path}: empty file; expected a CSV header with a 'prompt' column") from None
        except csv.Error as err:
            raise DatasetError(f"{path}, line 1: not a CSV header: {err}") from None
        if "prompt" not in header:
            raise DatasetError(f"{path}, line 1: no 'prompt' column; columns are {', '.join(header[:12])}")
        cost_models = [h.split("|", 1)[0] for h in header if h.endswith("|total_cost")]
        if fmt == "auto":
            fmt = "routerbench" if any("|" in h for h in header) else "routellm"
        if fmt == "routerbench":
            models = [h for h in header if "|" not in h and h not in _META_COLUMNS]
        else:
            models = [h for h in header if h not in _META_COLUMNS and not h.endswith("_response") and "|" not in h]
        if not models:
            raise DatasetError(f"{path}, line 1: no model outcome columns found besides {', '.join(header[:6])}")
        col = {h: i for i, h in enumerate(header)}
        has_cost = fmt == "routerbench" and all(m in cost_models for m in models)
        reply = {m: col.get(f"{m}|model_response" if fmt == "routerbench" else f"{m}_response") for m in models}
        has_replies = all(i is not None for i in reply.values())
        b = _Builder(str(path), models)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                raise DatasetError(f"{path}, line {reader.line_num}: unparseable CSV: {err}") from None
            if not row:
                continue
            if len(row) != len(header):
                b.skipped["wrong number of columns"] += 1
                continue
            query = _unwrap_prompt(row[col["prompt"]])
            outcomes = {m: row[col[m]] for m in models}
            costs = {m: row[col[f"{m}|total_cost"]] for m in models} if has_cost else None
            replies = {m: _reply(row[i]) for m, i in reply.items()} if has_replies else None
            b.add(query, outcomes, costs, row[col["eval_name"]] if "eval_name" in col else None, replies)
    return b.build()


def _json_records(path: Path):
    """(line number, record) for a JSON list file or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}, line {err.lineno}: not valid JSON: {err.msg}") from None
        for i, rec in enumerate(data):
            yield i + 1, rec
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}, line {lineno}: not valid JSON: {err.msg}") from None


PER_EXPERT = ("outcomes", "costs", "detail")   # the fields of a native line keyed by expert


def fold_by_id(records: list) -> list:
    """Native records with the lines of one ``id`` folded into its first (``outcomes``, ``costs`` and
    ``detail`` united; a later line wins for the same expert): what ``coe experts profile`` appends
    when another expert is profiled into an existing file. Anything without an ``id`` (a record, or
    not a record at all) is kept as it is. The input is not changed."""
    return [rec for _, rec in _fold(records)]


def _fold(records: list) -> list[tuple[int, object]]:
    """:func:`fold_by_id`, each result with the index of the input it starts from."""
    out: list[tuple[int, object]] = []
    first: dict[str, dict] = {}
    for i, rec in enumerate(records):
        key = rec.get("id") if isinstance(rec, dict) else None
        if key is None:
            out.append((i, rec))
        elif str(key) not in first:
            first[str(key)] = dict(rec)
            out.append((i, first[str(key)]))
        else:
            head = first[str(key)]
            for name in PER_EXPERT:
                if isinstance(rec.get(name), dict):
                    head[name] = {**(head.get(name) or {}), **rec[name]}
    return out


def _read_json(path: Path, fmt: str) -> RoutingData:
    records = list(_json_records(path))
    if not records:
        raise DatasetError(f"{path}: no records")
    if fmt in ("auto", "native") and isinstance(records[0][1], dict) and "outcomes" in records[0][1]:
        records = [(records[i][0], rec) for i, rec in _fold([r for _, r in records])]   # line: the id's first
    first_line, first = records[0]
    if not isinstance(first, dict):
        raise DatasetError(f"{path}, line {first_line}: each record must be a JSON object")
    if fmt == "auto":
        fmt = "mtbench" if {"question_id", "model", "score", "turn"} <= set(first) else (
            "scores" if "scores" in first else "native")
    if fmt == "mtbench":
        return _read_mtbench(path, records)
    qkey, okey = ("question", "scores") if fmt == "scores" else ("query", "outcomes")
    models: list[str] = []
    for lineno, rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get(okey), dict):
            raise DatasetError(f"{path}, line {lineno}: expected an object with {qkey!r} and an {okey!r} mapping")
        for m in rec[okey]:
            if m not in models:
                models.append(str(m))
    b = _Builder(str(path), models)
    has_cost = fmt == "native" and any(isinstance(r.get("costs"), dict) for _, r in records)
    for _, rec in records:
        costs = rec.get("costs") if has_cost else None
        b.add(rec.get(qkey), rec[okey], costs if isinstance(costs, dict) or not has_cost else {}, rec.get("category"))
    return b.build()


_MT_QUESTIONS = ("mt_bench_questions.jsonl", "question.jsonl")


def _read_mtbench(path: Path, records: list) -> RoutingData:
    qfile = next((path.parent / n for n in _MT_QUESTIONS if (path.parent / n).is_file()), None)
    if qfile is None:
        raise DatasetError(f"{path}: MT-Bench judgements need the questions file beside them ({' or '.join(_MT_QUESTIONS)})")
    questions = {}
    for lineno, rec in _json_records(qfile):
        if not isinstance(rec, dict) or not isinstance(rec.get("turns"), list) or "question_id" not in rec:
            raise DatasetError(f"{qfile}, line {lineno}: expected an object with 'question_id' and a 'turns' list")
        questions[rec["question_id"]] = rec
    rows: dict[tuple, dict] = {}
    models: list[str] = []
    for lineno, rec in records:
        if not isinstance(rec, dict) or not {"question_id", "model", "turn", "score"} <= set(rec):
            raise DatasetError(f"{path}, line {lineno}: expected an object with question_id, model, turn and score")
        if str(rec["model"]) not in models:
            models.append(str(rec["model"]))
        rows.setdefault((rec["question_id"], int(rec["turn"])), {})[str(rec["model"])] = rec["score"]
    b = _Builder(str(path), models)
    for (qid, turn), outcomes in sorted(rows.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        q = questions.get(qid)
        if q is None or turn < 1 or turn > len(q["turns"]):
            b.skipped["no such question turn"] += 1
            continue
        b.add("\n\n".join(str(t) for t in q["turns"][:turn]), outcomes, None, q.get("category"))
    return b.build()


def load_routing_data(path: str | Path, fmt: str = "auto", costs: str | Path | None = None) -> RoutingData:
    """Read a routing dataset (see the module docstring); ``costs`` is an optional cost table file."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    is_csv = fmt in ("routerbench", "routellm") or (fmt == "auto" and path.suffix.lower() == ".csv")
    data = _read_csv(path, fmt) if is_csv else _read_json(path, fmt)
    if costs is not None:
        data = data.with_cost_table(load_cost_table(costs))
    return data


def load_cost_table(path: str | Path) -> dict[str, float]:
    """``{model: cost per query}`` from JSON, YAML, or a two-column ``model,cost`` CSV."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"cost table {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        table = {}
        for lineno, row in enumerate(csv.reader(text.splitlines()), 1):
            if not row or (lineno == 1 and _outcome(row[-1]) is None):
                continue   # blank line or header
            if len(row) != 2 or _outcome(row[1]) is None:
                raise DatasetError(f"{path}, line {lineno}: expected 'model,cost', got {row!r}")
            table[row[0].strip()] = float(row[1])
        return table
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception as err:   # yaml.YAMLError; JSON is YAML
        raise DatasetError(f"{path}: not valid JSON/YAML: {err}") from None
    if not isinstance(data, dict) or not all(_outcome(v) is not None for v in data.values()):
        raise DatasetError(f"{path}: a cost table maps model names to numbers, e.g. {{\"gpt-4\": 0.03}}")
    return {str(k): float(v) for k, v in data.items()}


def shared_prefix(queries: list[str], min_chars: int = 200) -> str:
    """The few-shot header every query starts with (cut at a paragraph break), or ``""``.

    RouterBench prompts repeat the same few-shot examples before each question; that header
    carries no routing signal and would fill the embedder's window, so evaluation embeds what
    follows it. Only a prefix of at least ``min_chars`` shared by *all* queries counts.
    """
    import os

    if len(queries) < 2:
        return ""
    prefix = os.path.commonprefix(queries)
    cut = prefix.rfind("\n\n")
    prefix = prefix[: cut + 2] if cut >= 0 else ""
    return prefix if len(prefix) >= min_chars else ""


def routing_texts(queries: list[str], prefix: str) -> list[str]:
    """The queries with ``prefix`` removed where they start with it (the text routers embed)."""
    n = len(prefix)
    return [q[n:] if n and q.startswith(prefix) else q for q in queries]


def embed_routing_data(embedder, train: RoutingData, test: RoutingData | None = None):
    """``(train embeddings, test embeddings or None, prefix)``: unit-norm embeddings of the routing
    texts (:func:`routing_texts`), with the few-shot header shared by the train queries
    (:func:`shared_prefix`) removed from both sets."""
    prefix = shared_prefix(train.queries)
    xtr = embedder.encode(routing_texts(train.queries, prefix))
    xte = embedder.encode(routing_texts(test.queries, prefix)) if test is not None else None
    return xtr, xte, prefix
