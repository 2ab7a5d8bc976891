"""Which probes to measure a new expert on: ``adaptive``, ``information``, ``round_robin`` or ``random``, in waves.

The same small API serves the offline simulation (``coe eval new-expert``) and the live profile
job: given the candidate probes' :class:`ItemBank` (fitted on the already-fitted experts' outcomes
``[N, M]``), the probes the new expert has answered so far and its outcomes on them,
:func:`next_probes` returns the indices of the next wave; :meth:`ItemBank.ability` gives the
ability estimate and its standard error (what a ``stop_when`` rule reads), :meth:`ItemBank.predict`
the expected outcome on every candidate.

- ``random``: a seeded permutation of the candidates.
- ``round_robin``: file order, round-robin over categories.
- ``adaptive`` (anchor points, after tinyBenchmarks, arXiv 2402.14992): each wave extends, greedily,
  the set of probes that best *covers* the candidates, in a space where two probes are close when
  their queries embed alike *and* the fitted experts did alike on them (facility location:
  maximise ``Σ_i max_{s ∈ asked} sim(i, s)``, so every prefix is a good set of its size). The
  new expert's outcomes on a covering set predict its other cells best: the router fills an
  unmeasured cell from its nearest measured probes, so what matters is that every candidate has
  a near, like-behaving measured probe.
- ``information``: computerized adaptive testing under a 2PL IRT model: the unasked probes with
  the largest Fisher information ``a_i² p_i (1 − p_i)``, averaged over the new expert's ability
  posterior. It pins the *ability* down fastest, but its probes cluster at the new expert's
  difficulty level, and on the routing dev sets that biased the filled cells (on winogrande at
  b = 50 it lost AIQ against random; ``bench/results/new_expert.md``). Kept for comparison.

:class:`ItemBank` fits, by MAP, a discrimination ``a_i`` and an intercept ``d_i`` per candidate
probe and an ability ``θ_j`` per fitted expert, ``P(y_ij = 1) = σ(a_i θ_j − d_i)`` (outcomes
rescaled to 0..1; soft outcomes are fractional targets); the new expert's ability posterior (EAP
on a grid, prior: the fitted experts' abilities) is updated from its outcomes so far. It also
holds the candidates' coverage features (:func:`coverage_features`). The item parameters are free
per probe, not predicted from the query embedding as in the ``irt`` router. Pure numpy/scipy;
no state beyond the fitted bank; thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("adaptive", "information", "round_robin", "random")
OUTCOME_WEIGHT = 0.5                     # weight of the outcome pattern beside the query embedding
_POOL = 3000                              # coverage is measured against at most this many candidates
_GRID = np.linspace(-6.0, 6.0, 121)     # ability grid of the EAP posterior


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class Ability:
    """EAP ability estimate ``theta`` of the new expert and its posterior standard deviation ``se``."""

    theta: float
    se: float
    answered: int


@dataclass(frozen=True)
class ItemBank:
    """A 2PL model of the candidate probes, fitted on the fitted experts' outcomes (see the module
    docstring). ``a``, ``d``: ``[N]``; ``theta``: ``[M]``; ``bounds``: the outcome scale (lo, hi)."""

    a: np.ndarray
    d: np.ndarray
    theta: np.ndarray
    bounds: tuple[float, float]
    features: np.ndarray          # [N, F] unit-norm coverage features of the candidates

    @classmethod
    def fit(cls, outcomes: np.ndarray, observed: np.ndarray | None = None, *, embeddings: np.ndarray | None = None,
            a_sd: float = 0.5, d_sd: float = 3.0, max_iter: int = 300) -> ItemBank:
        """MAP fit on ``outcomes`` ``[N, M]`` (cells where ``observed`` is False are ignored).
        ``embeddings`` ``[N, D]``: the probes' query embeddings, for the coverage features (without
        them ``adaptive`` covers the outcome patterns alone).

        Priors: ``θ_j ~ N(0, 1)`` (fixes the scale), ``a_i ~ N(1, a_sd²)``, ``d_i ~ N(0, d_sd²)``:
        with a handful of experts a probe's discrimination is barely identified, so it stays near 1
        unless the outcomes clearly order the experts. Raises ValueError with fewer than 2 experts.
        """
        from scipy.optimize import minimize

        y = np.asarray(outcomes, dtype=np.float64)
        if y.ndim != 2 or y.shape[1] < 2:
            raise ValueError(f"an item bank needs the outcomes of at least 2 experts, got shape {y.shape}")
        mask = np.isfinite(y) if observed is None else (np.asarray(observed, dtype=bool) & np.isfinite(y))
        lo, hi = float(y[mask].min()), float(y[mask].max())
        hi = hi if hi > lo else lo + 1.0
        t = np.where(mask, (np.where(mask, y, lo) - lo) / (hi - lo), 0.0)          # [N, M] in 0..1
        w = mask.astype(np.float64)
        n, m = y.shape
        rate = np.clip((t * w).sum(axis=1) / np.maximum(w.sum(axis=1), 1), 0.02, 0.98)
        skill = np.clip((t * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1), 0.02, 0.98)
        th0 = np.log(skill / (1 - skill))
        th0 = (th0 - th0.mean()) / (th0.std() + 1e-9) if m > 1 else th0
        init = np.concatenate([np.ones(n), -np.log(rate / (1 - rate)), th0])

        def loss_grad(v):
            a, d, th = v[:n], v[n:2 * n], v[2 * n:]
            z = a[:, None] * th[None, :] - d[:, None]                              # [N, M]
            r = w * (_sigmoid(z) - t)                                              # dNLL/dz
            loss = (np.sum(w * (np.logaddexp(0.0, z) - t * z)) + 0.5 * np.sum((a - 1) ** 2) / a_sd ** 2
                    + 0.5 * np.sum(d ** 2) / d_sd ** 2 + 0.5 * np.sum(th ** 2))
            ga = r @ th + (a - 1) / a_sd ** 2
            gd = -r.sum(axis=1) + d / d_sd ** 2
            gth = r.T @ a + th
            return loss, np.concatenate([ga, gd, gth])

        res = minimize(loss_grad, init, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
        v = res.x
        return cls(a=v[:n].copy(), d=v[n:2 * n].copy(), theta=v[2 * n:].copy(), bounds=(lo, hi),
                   features=coverage_features(np.where(mask, t, np.nan), embeddings))

    def __len__(self) -> int:
        return len(self.a)

    # -- the new expert -----------------------------------------------------------------------
    def _prob(self) -> np.ndarray:
        return _sigmoid(_GRID[:, None] * self.a[None, :] - self.d[None, :])        # [G, N]

    def posterior(self, asked: Sequence[int], outcomes: Sequence[float]) -> np.ndarray:
        """Posterior weights ``[G]`` of the new expert's ability on the grid. Prior: normal with
        the fitted experts' mean ability and spread (at least 0.5)."""
        th = self.theta
        mu, sd = float(th.mean()), max(float(th.std()), 0.5)
        logw = -0.5 * ((_GRID - mu) / sd) ** 2                                     # [G]
        idx = np.asarray(asked, dtype=np.int64)
        if idx.size:
            lo, hi = self.bounds
            y = np.clip((np.asarray(outcomes, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)   # [K]
            z = _GRID[:, None] * self.a[idx][None, :] - self.d[idx][None, :]      # [G, K]
            logw = logw + (y[None, :] * z - np.logaddexp(0.0, z)).sum(axis=1)
        w = np.exp(logw - logw.max())
        return w / w.sum()

    def ability(self, asked: Sequence[int], outcomes: Sequence[float]) -> Ability:
        """EAP ability of the new expert from its outcomes on ``asked`` and the posterior SD."""
        w = self.posterior(asked, outcomes)
        theta = float(w @ _GRID)
        return Ability(theta, float(np.sqrt(w @ (_GRID - theta) ** 2)), len(asked))

    def information(self, asked: Sequence[int], outcomes: Sequence[float]) -> np.ndarray:
        """Fisher information ``[N]`` of every candidate, averaged over the ability posterior."""
        p = self._prob()                                                           # [G, N]
        return self.posterior(asked, outcomes) @ (p * (1 - p)) * self.a ** 2

    def predict(self, asked: Sequence[int], outcomes: Sequence[float], *, keep_measured: bool = True) -> np.ndarray:
        """Posterior-predictive expected outcome ``[N]`` of the new expert on every candidate, on
        the outcome scale (the measured outcome where it was asked, unless ``keep_measured`` is False)."""
        lo, hi = self.bounds
        out = lo + (hi - lo) * (self.posterior(asked, outcomes) @ self._prob())
        idx = np.asarray(asked, dtype=np.int64)
        if idx.size and keep_measured:
            out[idx] = np.asarray(outcomes, dtype=np.float64)
        return out


def coverage_features(outcomes: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
    """Unit-norm features ``[N, F]`` in which probes are close when their queries embed alike and
    the fitted experts did alike on them: the unit query embedding beside the probe's centred,
    unit-norm outcome pattern (weight :data:`OUTCOME_WEIGHT`). NaN outcomes count as the probe's mean."""
    y = np.asarray(outcomes, dtype=np.float64)
    row = np.nanmean(np.where(np.isfinite(y), y, np.nan), axis=1, keepdims=True) if y.size else y
    y = np.where(np.isfinite(y), y, np.nan_to_num(row))
    y = y - y.mean(axis=0, keepdims=True)
    parts = [OUTCOME_WEIGHT * y / (np.linalg.norm(y, axis=1, keepdims=True) + 1e-9)]
    if embeddings is not None:
        e = np.asarray(embeddings, dtype=np.float64)
        if len(e) != len(y):
            raise ValueError(f"{len(e)} probe embeddings for {len(y)} probes")
        parts.insert(0, e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-9))
    z = np.concatenate(parts, axis=1)
    return z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-9)


def cover(features: np.ndarray, asked: Sequence[int], k: int, *, seed: int = 0) -> np.ndarray:
    """``k`` more probes that, with ``asked``, best cover every candidate (greedy facility
    location on cosine similarity, clipped at 0). Over :data:`_POOL` candidates, the coverage is
    measured against a seeded sample of them (the picks still come from every candidate)."""
    z = np.asarray(features, dtype=np.float64)
    n = len(z)
    ref = z if n <= _POOL else z[np.sort(np.random.default_rng(seed).choice(n, _POOL, replace=False))]
    sim = np.maximum(ref @ z.T, 0.0)                                               # [R, N]
    idx = np.asarray(asked, dtype=np.int64)
    best = sim[:, idx].max(axis=1) if idx.size else np.zeros(len(ref))             # [R] coverage so far
    free = np.ones(n, dtype=bool)
    free[idx] = False
    out: list[int] = []
    for _ in range(min(k, int(free.sum()))):
        gain = np.maximum(sim - best[:, None], 0.0).sum(axis=0)
        gain[~free] = -1.0
        c = int(np.argmax(gain))
        out.append(c)
        free[c] = False
        best = np.maximum(best, sim[:, c])
    return np.asarray(out, dtype=np.int64)


# ------------------------------------------------------------------------------ strategies


def round_robin_order(n: int, categories: Sequence[str] | None = None) -> np.ndarray:
    """All ``n`` candidates in the live profile job's order: file order, round-robin over categories."""
    if not categories:
        return np.arange(n)
    queues: dict[str, list[int]] = {}
    for i, c in enumerate(categories[:n]):
        queues.setdefault(c or "", []).append(i)
    lists, out = list(queues.values()), []
    for r in range(max(len(q) for q in lists)):
        out += [q[r] for q in lists if r < len(q)]
    return np.asarray(out, dtype=np.int64)


def next_probes(strategy: str, n: int, asked: Sequence[int], outcomes: Sequence[float], wave: int, *,
                bank: ItemBank | None = None, categories: Sequence[str] | None = None,
                seed: int = 0) -> np.ndarray:
    """Indices (into the ``n`` candidates) of the next ``wave`` probes to measure, none in ``asked``.

    ``adaptive`` and ``information`` need ``bank`` (an :class:`ItemBank` over the same candidates); ``random`` is a
    fixed permutation per ``seed`` (so successive waves never repeat); ``round_robin`` reads
    ``categories``. Fewer than ``wave`` come back when the candidates run out. Raises ValueError
    for an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown probe strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    done = np.zeros(n, dtype=bool)
    done[np.asarray(asked, dtype=np.int64)] = True
    wave = min(int(wave), int((~done).sum()))
    if wave <= 0:
        return np.zeros(0, dtype=np.int64)
    if strategy in ("adaptive", "information"):
        if bank is None or len(bank) != n:
            raise ValueError(f"the {strategy} strategy needs an ItemBank fitted on the same candidates")
        if strategy == "adaptive":
            return cover(bank.features, asked, wave, seed=seed)
        info = np.where(done, -np.inf, bank.information(asked, outcomes))
        return np.argsort(-info, kind="stable")[:wave]
    order = np.random.default_rng(seed).permutation(n) if strategy == "random" else round_robin_order(n, categories)
    return order[~done[order]][:wave]


def choose_probes(strategy: str, others: np.ndarray, answer: Callable[[np.ndarray], np.ndarray], budget: int, *,
                  wave: int = 5, categories: Sequence[str] | None = None, seed: int = 0,
                  bank: ItemBank | None = None, embeddings: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a strategy to ``budget`` probes: ``(asked [b], outcomes [b])`` in the order asked.

    ``others`` ``[N, M]``: the fitted experts' outcomes on the candidates (the adaptive bank is
    fitted on it unless ``bank`` is given); ``answer(indices) -> outcomes`` measures the new
    expert. The first ``k · wave`` entries are what the strategy had chosen after ``k`` waves.
    ``embeddings``: the candidates' query embeddings, for the bank fitted here.
    """
    n = len(others)
    if strategy in ("adaptive", "information") and bank is None:
        bank = ItemBank.fit(others, embeddings=embeddings)
    if strategy == "adaptive":            # the new expert's outcomes don't steer the cover: one greedy run
        asked = cover(bank.features, [], min(budget, n), seed=seed)
        got = np.concatenate([np.asarray(answer(asked[i:i + wave]), dtype=np.float64)
                              for i in range(0, len(asked), max(1, wave))]) if len(asked) else np.zeros(0)
        return asked, got
    asked: list[int] = []
    got: list[float] = []
    while len(asked) < min(budget, n):
        idx = next_probes(strategy, n, asked, got, min(wave, budget - len(asked)), bank=bank,
                          categories=categories, seed=seed)
        if idx.size == 0:
            break
        asked += [int(i) for i in idx]
        got += [float(v) for v in np.asarray(answer(idx), dtype=np.float64)]
    return np.asarray(asked, dtype=np.int64), np.asarray(got, dtype=np.float64)
