"""Load any saved mixture folder (``mixture.json`` names its kind: ``mole`` or ``xlora``)."""

from __future__ import annotations

from pathlib import Path

from coe.errors import AdapterError

MIXTURE_KINDS = ("mole", "xlora")


def load_mixture(folder: str | Path, model):
    """A :class:`~coe.adapters.mole.MoLE` or :class:`~coe.adapters.xlora.XLoRA` on ``model`` (a plain
    transformers causal LM, modified in place). Raises AdapterError for an unknown kind."""
    from coe.adapters.mole import MoLE, read_mixture_meta
    from coe.adapters.xlora import XLoRA

    kind = read_mixture_meta(folder).get("kind")
    if kind == "mole":
        return MoLE.load(folder, model)
    if kind == "xlora":
        return XLoRA.load(folder, model)
    raise AdapterError(f"{folder}: unknown mixture kind {kind!r}; allowed: {', '.join(MIXTURE_KINDS)}")
