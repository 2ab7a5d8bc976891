"""``coe eval new-expert``: how many probes a newly registered expert needs before it is routed well.

Each model ``m`` of the data is left out in turn and comes back as the "new expert":

- ``without``: the router fitted on every other model's train outcomes routes the test queries
  over the other models only;
- ``full``: fitted on every model's full train outcomes (``m``'s whole profile);
- ``<strategy>@b``: fitted on the others' full outcomes plus ``m``'s outcomes on ``b`` train
  probes chosen by the strategy (:mod:`coe.routers.probe_selection`); ``m``'s other train cells
  are unobserved (``RoutingData.observed``), as a runtime profile leaves them. Routers that fit
  on the mask (``irt``) ignore those cells; for the others they are filled as the service
  fills them (``impute="knn"``: :func:`coe.routers.profile_data.impute_missing`, the other models'
  outcomes on the same probe plus ``m``'s deviation on its nearest measured probes), or with the item bank's prediction (``impute="irt"``: the 2PL model of the
  probes fitted on the other models, at ``m``'s ability posterior).

It then routes the test queries over all models (λ sweep of the shared policy) and reports per
strategy and budget: test AIQ and top quality (mean over the held-out models), the share of the
full profile's gain recovered, ``Σ_m (AIQ_b − AIQ_without) / Σ_m (AIQ_full − AIQ_without)``
over the models whose full profile moves AIQ by at least ``MIN_GAIN`` (a ratio of sums, so
models that barely matter do not dominate), with paired-bootstrap 95% CIs over the test queries
(:func:`coe.routers.evaluate.bootstrap_aiqs`; for ``random`` each replicate also resamples the
seeds), and how well ``m``'s test outcomes are predicted (Brier; AUC where they are 0/1).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

from coe.errors import ConfigError

IMPUTERS = ("knn", "irt")
MIN_GAIN = 0.002


@dataclass
class NewExpertSetup:
    """What to simulate (``coe eval new-expert``'s options)."""

    strategies: list[str] = field(default_factory=lambda: ["adaptive", "information", "round_robin", "random"])
    budgets: list[int] = field(default_factory=lambda: [10, 25, 50, 100, 200])
    seeds: int = 5                 # seeds of the random strategy (the others are deterministic)
    router: str = "knn"
    params: dict = field(default_factory=dict)
    impute: str = "knn"
    wave: int = 5
    n_boot: int = 1000
    seed: int = 0

    def check(self, n_models: int) -> None:
        from coe.routers.base import router_class
        from coe.routers.probe_selection import STRATEGIES

        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or not self.strategies:
            raise ConfigError(f"--strategies: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(STRATEGIES)}")
        if not self.budgets or min(self.budgets) < 1:
            raise ConfigError(f"--budgets must be positive integers, got {self.budgets}")
        if self.impute not in IMPUTERS:
            raise ConfigError(f"--impute {self.impute!r}; allowed: {', '.join(IMPUTERS)}")
        if self.seeds < 1 or self.wave < 1 or self.n_boot < 10:
            raise ConfigError("--seeds and --wave must be at least 1 and --bootstrap at least 10")
        if router_class(self.router).needs_labels:
            raise ConfigError(f"router {self.router!r} reads the true outcomes; it cannot be profiled")
        if n_models < 3:
            raise ConfigError(f"the data has {n_models} models; leaving one out needs at least 3")


def columns(data, idx):
    """``data`` restricted to the model columns ``idx`` (in that order)."""
    from coe.routers.datasets import RoutingData

    idx = list(idx)
    return RoutingData(
        list(data.queries), [data.models[i] for i in idx], data.quality[:, idx],
        None if data.cost is None else data.cost[:, idx], data.source, data.skipped, data.categories,
        None if data.observed is None else data.observed[:, idx],
    )


def masked_profile(train, embeddings: np.ndarray, j: int, asked: np.ndarray, *, impute: str = "knn", bank=None):
    """``train`` with column ``j`` observed only on the rows ``asked`` (the rest marked unobserved
    and filled by ``impute``; ``bank``: the :class:`ItemBank` of the other columns for ``irt``)."""
    from coe.routers.datasets import RoutingData
    from coe.routers.profile_data import impute_missing

    quality = np.array(train.quality, dtype=np.float64)
    cost = np.array(train.costs_or_ones(), dtype=np.float64)
    observed = np.ones(quality.shape, dtype=bool)
    observed[:, j] = False
    observed[asked, j] = True
    emb = np.asarray(embeddings, dtype=np.float32)
    if impute == "irt":
        # the bank's prediction corrects for which probes were asked (an adaptive choice is not a
        # sample of the set); m's own deviation from it is spread to its nearest probes, as the
        # service spreads outcomes
        pred = bank.predict(asked, train.quality[asked, j], keep_measured=False)
        quality[:, j] = np.where(observed[:, j], quality[:, j] - pred, 0.0)
        impute_missing(quality, cost, observed, emb)
        lo, hi = bank.bounds
        quality[:, j] = np.where(observed[:, j], train.quality[:, j], np.clip(quality[:, j] + pred, lo, hi))
    else:
        impute_missing(quality, cost, observed, emb)       # the service's fill
    return RoutingData(list(train.queries), list(train.models), quality, None if train.cost is None else cost,
                       f"{train.source} (profile of {train.models[j]} on {len(asked)} probes)", train.skipped,
                       train.categories, observed)


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    if not np.isin(y, (0.0, 1.0)).all() or len(np.unique(y)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def simulate(train, test, train_emb: np.ndarray, test_emb: np.ndarray, setup: NewExpertSetup, *, ctx=None,
             progress=None) -> dict:
    """Run the leave-one-model-out simulation; returns the report dict (``summary``: one record per
    strategy and budget, see the module docstring). ``test`` must have ``train``'s columns in
    ``train``'s order. ``progress``: an optional callable(str) told about each held-out model."""
    from coe.routers.base import FitContext, QueryBatch, create_router
    from coe.routers.evaluate import Reference, bootstrap_aiqs, calibration, sweep_picks
    from coe.routers.probe_selection import ItemBank, choose_probes

    setup.check(len(train.models))
    ctx = ctx or FitContext(seed=setup.seed)
    ref = Reference.from_data(test)
    budgets = sorted({min(int(b), len(train)) for b in setup.budgets})
    models = list(train.models)
    picks: dict[str, np.ndarray] = {}
    cells: dict[str, dict] = {}           # label -> {"top_quality", "brier", "auc", "ability_se"}

    def routed(label: str, data, emb, cols: list[int], j: int | None, extra: dict | None = None) -> None:
        router = create_router(setup.router, setup.params).fit(data, emb, ctx)
        sub = test if cols == list(range(len(models))) else columns(test, cols)
        _, p = sweep_picks(router, sub, test_emb)
        p = np.asarray(cols)[p]                                            # [L, N] columns of test
        picks[label] = np.unique(p, axis=0).astype(np.int32)
        rows = np.arange(len(test))
        info = {"top_quality": float(test.quality[rows[None, :], p].mean(axis=1).max()), **(extra or {})}
        if j is not None:
            pred = router.score(QueryBatch(list(test.queries), test_emb)).quality[:, cols.index(j)]
            info["brier"] = calibration(pred[:, None], test.quality[:, [j]])["brier"]
            info["auc"] = _auc(test.quality[:, j], pred)
        cells[label] = info

    everyone = list(range(len(models)))
    for j, m in enumerate(models):
        if progress:
            progress(m)
        others = [k for k in everyone if k != j]
        routed(f"{m}|without", columns(train, others), train_emb, others, None)
        routed(f"{m}|full", train, train_emb, everyone, j)
        bank = ItemBank.fit(train.quality[:, others], None if train.observed is None else train.observed[:, others],
                            embeddings=train_emb)
        for strategy in setup.strategies:
            for s in range(setup.seeds if strategy == "random" else 1):
                asked, got = choose_probes(strategy, train.quality[:, others], lambda idx, j=j: train.quality[idx, j],
                                           budgets[-1], wave=setup.wave, categories=train.categories,
                                           seed=setup.seed + s, bank=bank)
                for b in budgets:
                    data = masked_profile(train, train_emb, j, asked[:b], impute=setup.impute, bank=bank)
                    se = bank.ability(asked[:b], got[:b]).se
                    routed(f"{m}|{strategy}|{b}|{s}", data, train_emb, everyone, j, {"ability_se": se})
    aiqs = bootstrap_aiqs(picks, test, n_boot=setup.n_boot, seed=setup.seed)
    return _report(train, test, ref, setup, budgets, aiqs, cells)


def _report(train, test, ref, setup: NewExpertSetup, budgets: list[int], aiqs: dict, cells: dict) -> dict:
    from coe.routers.report import machine

    models = list(train.models)
    n_rep = setup.n_boot + 1
    gain = {m: float(aiqs[f"{m}|full"][0] - aiqs[f"{m}|without"][0]) for m in models}
    used = [m for m in models if gain[m] >= MIN_GAIN]
    rng = np.random.default_rng(setup.seed + 1)
    seed_draw = np.vstack([np.arange(setup.seeds), rng.integers(0, setup.seeds, (n_rep - 1, setup.seeds))])

    def runs(strategy: str) -> int:
        return setup.seeds if strategy == "random" else 1

    def aiq_of(m: str, strategy: str, b: int) -> np.ndarray:
        """[n_rep] AIQ of m's profile, the seeds resampled per replicate (row 0: their mean)."""
        k = runs(strategy)
        stack = np.stack([aiqs[f"{m}|{strategy}|{b}|{s}"] for s in range(k)], axis=1)   # [R, S]
        draw = seed_draw[:, :k] if k > 1 else np.zeros((n_rep, 1), dtype=np.int64)
        return np.take_along_axis(stack, draw, axis=1).mean(axis=1)

    den = sum((aiqs[f"{m}|full"] - aiqs[f"{m}|without"] for m in used), np.zeros(n_rep))

    def recovered(strategy: str, b: int) -> np.ndarray | None:
        if not used:
            return None
        num = sum((aiq_of(m, strategy, b) - aiqs[f"{m}|without"] for m in used), np.zeros(n_rep))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(den != 0, num / den, np.nan)        # a replicate where no profile gains says nothing

    def percentiles(v: np.ndarray) -> list[float]:
        ok = v[1:][np.isfinite(v[1:])]
        return [float(x) for x in np.percentile(ok, [2.5, 97.5])] if ok.size else [None, None]

    def interval(v: np.ndarray) -> dict:
        lo, hi = percentiles(v)
        return {"diff": float(v[0]), "lo": lo, "hi": hi, "excludes_zero": lo is not None and bool(lo > 0 or hi < 0)}

    def mean_cell(strategy: str, b: int, key: str) -> float | None:
        vals = [cells[f"{m}|{strategy}|{b}|{s}"].get(key) for m in models for s in range(runs(strategy))]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    summary, per_model = [], {m: {"gain": gain[m], "counted": m in used, "aiq_without": float(aiqs[f"{m}|without"][0]),
                                  "aiq_full": float(aiqs[f"{m}|full"][0]), "recovered": {}} for m in models}
    for strategy in setup.strategies:
        for b in budgets:
            rec = recovered(strategy, b)
            rec_random = recovered("random", b) if "random" in setup.strategies and strategy != "random" else None
            aiq_mean = np.mean([aiq_of(m, strategy, b) for m in models], axis=0)
            aiq_random = (np.mean([aiq_of(m, "random", b) for m in models], axis=0)
                          if rec_random is not None else None)
            summary.append({
                "strategy": strategy, "budget": b,
                "aiq": float(aiq_mean[0]),
                "top_quality": mean_cell(strategy, b, "top_quality"),
                "recovered": None if rec is None else float(rec[0]),
                "recovered_ci": None if rec is None else percentiles(rec),
                "brier": mean_cell(strategy, b, "brier"),
                "auc": mean_cell(strategy, b, "auc"),
                "ability_se": mean_cell(strategy, b, "ability_se"),
                "vs_random": None if rec_random is None else {"recovered": interval(rec - rec_random),
                                                              "aiq": interval(aiq_mean - aiq_random)},
            })
            for m in models:
                per_model[m]["recovered"].setdefault(strategy, {})[str(b)] = (
                    float((aiq_of(m, strategy, b)[0] - aiqs[f"{m}|without"][0]) / gain[m]) if gain[m] >= MIN_GAIN else None)
    full_cells = [cells[f"{m}|full"] for m in models]
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "train": {"source": train.source, "rows": len(train), "skipped": dict(train.skipped)},
        "test": {"source": test.source, "rows": len(test), "skipped": dict(test.skipped)},
        "models": models,
        "costs": "per-query costs of the data" if test.cost is not None else "none in the data: every model costs 1 "
                 "(AIQ is then the top quality)",
        "cost_range": [ref.c_min, ref.c_max],
        "setup": {"router": setup.router, "params": setup.params, "impute": setup.impute, "wave": setup.wave,
                  "strategies": list(setup.strategies), "budgets": budgets, "seeds": setup.seeds,
                  "bootstrap": setup.n_boot, "seed": setup.seed, "min_gain": MIN_GAIN},
        "reference": {
            "aiq_without": float(np.mean([aiqs[f"{m}|without"][0] for m in models])),
            "aiq_full": float(np.mean([aiqs[f"{m}|full"][0] for m in models])),
            "top_quality_full": float(np.mean([c["top_quality"] for c in full_cells])),
            "brier_full": float(np.mean([c["brier"] for c in full_cells])),
            "zero_router_aiq": ref.zero_router_aiq,
            "counted_models": used,
            "gain_sum": float(den[0]),
        },
        "summary": summary,
        "per_model": per_model,
    }
