"""Which probes to measure a new expert on: ``adaptive``, ``round_robin`` or ``random``, in waves.

The same small API serves the offline simulation (``coe eval new-expert``) and, later, the live
profile job: given the fitted experts' outcomes on the candidate probes ``[N, M]``, the probes
the new expert has answered so far and its outcomes on them, :func:`next_probes` returns the
indices of the next wave; :meth:`ItemBank.ability` gives the ability estimate and its standard
error (what a ``stop_when`` rule reads), :meth:`ItemBank.predict` the expected outcome on every
candidate (what the unmeasured cells of the new expert's column can be filled with).

- ``random``: a seeded permutation of the candidates.
- ``round_robin``: the live profile job's rule: file order, round-robin over categories.
- ``adaptive``: computerized adaptive testing under a two-parameter logistic (2PL) IRT model.
  :class:`ItemBank` fits, by MAP, a discrimination ``a_i`` and an intercept ``d_i`` per
  candidate probe and an ability ``θ_j`` per fitted expert, ``P(y_ij = 1) = σ(a_i θ_j − d_i)``
  (outcomes rescaled to 0..1; soft outcomes such as a multiple-choice probability are
  fractional targets). The new expert's ability posterior (EAP on a grid, prior: the fitted
  experts' abilities) is updated from its outcomes so far; each wave takes the unasked probes
  with the largest Fisher information ``a_i² p_i (1 − p_i)`` averaged over that posterior
  (= the information at the current ability once the posterior is narrow).

The item parameters are free per probe, not predicted from the query embedding as in the
``irt`` router: what matters here is the probes themselves, and their outcome matrix says more
about them than an embedding-linear head regularised to generalise to unseen queries.
Pure numpy/scipy; no state beyond the fitted bank; thread-safe.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("adaptive", "round_robin", "random")
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

    @classmethod
    def fit(cls, outcomes: np.ndarray, observed: np.ndarray | None = None, *, a_sd: float = 0.5,
            d_sd: float = 3.0, max_iter: int = 300) -> ItemBank:
        """MAP fit on ``outcomes`` ``[N, M]`` (cells where ``observed`` is False are ignored).

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
        return cls(a=v[:n].copy(), d=v[n:2 * n].copy(), theta=v[2 * n:].copy(), bounds=(lo, hi))

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

    ``adaptive`` needs ``bank`` (an :class:`ItemBank` over the same candidates); ``random`` is a
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
    if strategy == "adaptive":
        if bank is None or len(bank) != n:
            raise ValueError("the adaptive strategy needs an ItemBank fitted on the same candidates")
        info = np.where(done, -np.inf, bank.information(asked, outcomes))
        return np.argsort(-info, kind="stable")[:wave]
    order = np.random.default_rng(seed).permutation(n) if strategy == "random" else round_robin_order(n, categories)
    return order[~done[order]][:wave]


def choose_probes(strategy: str, others: np.ndarray, answer: Callable[[np.ndarray], np.ndarray], budget: int, *,
                  wave: int = 5, categories: Sequence[str] | None = None, seed: int = 0,
                  bank: ItemBank | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run a strategy to ``budget`` probes: ``(asked [b], outcomes [b])`` in the order asked.

    ``others`` ``[N, M]``: the fitted experts' outcomes on the candidates (the adaptive bank is
    fitted on it unless ``bank`` is given); ``answer(indices) -> outcomes`` measures the new
    expert. The first ``k · wave`` entries are what the strategy had chosen after ``k`` waves.
    """
    n = len(others)
    if strategy == "adaptive" and bank is None:
        bank = ItemBank.fit(others)
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
