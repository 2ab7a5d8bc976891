"""``skill``: Symbolic-MoE's skill-based recruiting.

1. Skills of a query: by default the ``n_skills`` nearest entries of a skill vocabulary in
   embedding space (softmax weights at ``temperature``); the vocabulary is :data:`DEFAULT_SKILLS`
   plus every expert's configured ``skills``. Another extractor (e.g. an LLM that names skills)
   plugs in with :func:`register_skill_extractor` and ``params.extractor``.
2. Expert profiles from outcomes: per skill, each expert's weighted mean quality on the
   training queries showing that skill, shrunk toward a prior by ``shrink`` pseudo-queries.
   The prior is the expert's overall strength (its mean quality): strong experts stay strong
   where evidence is thin; on the skills an expert *declares* (its configured ``skills``,
   ``FitContext.skills``) the prior is the strongest expert's strength plus ``declared_bonus``,
   so the declaration decides where data is thin and the outcomes decide where it is not.
3. Expert score = Σ over the query's skills of weight × profile. With ``top_k > 0`` only the
   top-k experts keep their scores (the recruited set); the rest score −inf.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import Field

from coe.errors import ConfigError, available
from coe.plugins import Plugins
from coe.routers.base import FitContext, QueryBatch, Router, RouterParams, Scores, register_router

DEFAULT_SKILLS = [
    "arithmetic", "algebra", "geometry", "probability and statistics", "word problems", "calculus",
    "python programming", "writing functions", "string manipulation", "lists and arrays", "algorithms",
    "data structures", "recursion", "sorting", "regular expressions", "debugging code", "sql databases",
    "commonsense reasoning", "pronoun resolution", "physical intuition", "social situations",
    "logical deduction", "reading comprehension", "multiple choice questions", "fill in the blank",
    "grammar", "translation", "summarization", "creative writing", "poetry", "roleplay", "email writing",
    "history", "geography", "biology", "chemistry", "physics", "medicine", "law", "economics",
    "finance", "philosophy", "psychology", "politics", "sports", "music", "movies", "cooking",
    "travel", "technology", "science facts", "trivia", "extraction of information", "classification",
]

# name -> factory(router, ctx) -> callable(texts, embeddings) -> weights [B, K] over router.vocab
_EXTRACTORS: Plugins[Callable] = Plugins("skill extractor", stamp_name=False)


def register_skill_extractor(name: str):
    """Decorator: register a skill extractor factory under ``name`` (duplicates refused)."""
    return _EXTRACTORS.register(name)


class SkillParams(RouterParams):
    n_skills: int = Field(3, ge=1, le=64, description="Skills per query.")
    temperature: float = Field(0.05, gt=0, description="Softmax temperature over vocabulary similarities.")
    shrink: float = Field(10.0, ge=0, description="Pseudo-queries at the expert's overall strength per skill.")
    top_k: int = Field(0, ge=0, description="Recruit only the top-k experts (0: score all).")
    extractor: str = Field("embedding", description="Skill extractor: 'embedding' or a registered one.")
    declared_bonus: float = Field(
        0.05, ge=0, description="Prior of an expert on a skill it declares: the strongest expert's strength plus this.")


@register_router("skill")
class SkillRouter(Router):
    Params = SkillParams
    cv_grid = {"n_skills": [1, 3, 8], "shrink": [3.0, 10.0, 30.0]}

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.vocab: list[str] = []
        self.vocab_emb = np.zeros((0, 0), dtype=np.float32)   # [K, D]
        self.profile = np.zeros((0, 0))                        # [K, M]
        self.strength = np.zeros(0)                            # [M]

    def skill_weights(self, texts: list[str], embeddings: np.ndarray) -> np.ndarray:
        """Soft skill assignment ``[B, K]`` (rows sum to 1, ``n_skills`` non-zeros)."""
        if self.params.extractor != "embedding":
            if self.params.extractor not in _EXTRACTORS:
                raise ConfigError(f"unknown skill extractor {self.params.extractor!r}; "
                                  f"available: {available(['embedding', *_EXTRACTORS.names()])}")
            return _EXTRACTORS.get(self.params.extractor)(self)(texts, embeddings)
        sims = np.asarray(embeddings, dtype=np.float32) @ self.vocab_emb.T    # [B, K]
        n = min(self.params.n_skills, sims.shape[1])
        top = np.argpartition(-sims, n - 1, axis=1)[:, :n]                     # [B, n]
        top_s = np.take_along_axis(sims, top, axis=1) / self.params.temperature
        w = np.exp(top_s - top_s.max(axis=1, keepdims=True))
        weights = np.zeros_like(sims, dtype=np.float64)
        np.put_along_axis(weights, top, w / w.sum(axis=1, keepdims=True), axis=1)
        return weights

    def fit(self, data, embeddings, ctx: FitContext | None = None) -> SkillRouter:
        ctx = ctx or FitContext()
        if ctx.embed is None:
            raise ConfigError("the skill router needs an embedder at fit time (FitContext.embed)")
        self._set_experts(data)
        extra = [s for skills in ctx.skills.values() for s in skills]
        self.vocab = list(dict.fromkeys([*DEFAULT_SKILLS, *extra]))
        self.vocab_emb = np.asarray(ctx.embed(self.vocab), dtype=np.float32)
        w = self.skill_weights(list(data.queries), embeddings)        # [N, K]
        y = data.quality                                              # [N, M]
        self.strength = y.mean(axis=0)
        prior = np.tile(self.strength, (len(self.vocab), 1))          # [K, M]
        for expert, skills in ctx.skills.items():
            if expert in self.experts:
                rows = [self.vocab.index(sk) for sk in skills if sk in self.vocab]
                prior[rows, self.experts.index(expert)] = self.strength.max() + self.params.declared_bonus
        s = self.params.shrink
        self.profile = (w.T @ y + s * prior) / (w.sum(axis=0)[:, None] + s)   # [K, M]
        return self

    def score(self, batch: QueryBatch) -> Scores:
        w = self.skill_weights(batch.texts, batch.embeddings)         # [B, K]
        quality = w @ self.profile                                    # [B, M]
        k = self.params.top_k
        if 0 < k < quality.shape[1]:
            cut = -np.sort(-quality, axis=1)[:, k - 1 : k]
            quality = np.where(quality >= cut, quality, -np.inf)
        return self._scores(quality)

    def state(self):
        return {
            "vocab": np.array(self.vocab), "vocab_emb": self.vocab_emb,
            "profile": self.profile, "strength": self.strength,
        }

    def set_state(self, arrays) -> None:
        self.vocab = [str(v) for v in arrays["vocab"]]
        self.vocab_emb = arrays["vocab_emb"].astype(np.float32)
        self.profile, self.strength = arrays["profile"], arrays["strength"]
