"""What an engine is built from: :class:`EngineSpec`, the one argument of ``Engine.from_spec``.

A neutral, typed description (no deployment-layer types): the model, the engine settings and,
for the engines that need more than one model, the pool's models or the mixture's experts.
The deployment layer builds it (``ServerSpec.engine_spec()``); scripts and tests build it
directly. Paths and model references are expected resolved (absolute folders or aliases).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from coe.config import BatchingConfig, EngineConfig, PoolConfig


class MixtureSpec(BaseModel):
    """A MoLE / X-LoRA mixture over LoRA experts of the engine's model."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["mole", "xlora"] = Field("mole", description="The mixing method.")
    adapters: list[tuple[str, str]] = Field(
        default_factory=list, description="(name, PEFT folder) of each mixed expert, in gate order."
    )
    checkpoint: str | None = Field(None, description="Folder of a saved, trained mixture (mixture.json).")
    top_k: int | None = Field(None, ge=1, description="MoLE: keep only the top-k experts per layer.")
    window: BatchingConfig = Field(default_factory=BatchingConfig,
                                   description="The batching window in front of the mixture's one batch at a time.")


class EngineSpec(BaseModel):
    """Everything an engine needs to be built (picklable)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The engine's model: alias, folder or hub id (the pool: its first model).")
    config: EngineConfig = Field(default_factory=EngineConfig, description="Engine settings.")
    models: dict[str, str] = Field(
        default_factory=dict, description="The expert pool: expert id -> model reference, in order."
    )
    pool: PoolConfig | None = Field(None, description="The expert pool's residency and scheduling.")
    mixture: MixtureSpec | None = Field(None, description="The mixture engine's experts and method.")
