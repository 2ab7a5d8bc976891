"""``irt``: multidimensional item response theory over query embeddings (ability × difficulty).

Each expert ``j`` has an overall ability ``δ_j`` and an ability vector ``θ_j`` (``dim``
dimensions); each query ``i`` has a difficulty ``b_i`` and a discrimination vector ``a_i``,
both predicted from its embedding ``x_i`` by linear heads. The probability that the expert
answers well is::

    P(y_ij = 1) = σ(a_i · θ_j + δ_j − b_i),   a_i = x_i A + a_0,   b_i = x_i w + c

Fitted by L-BFGS on the Bernoulli log-likelihood of the observed outcomes (quality rescaled to
0..1, so graded scores such as MT-Bench's 1–10 are fractional targets), with

- ``l2`` on the embedding heads ``A``, ``w`` (chosen by cross-validation on train, ``cv_grid``);
- a population prior on the experts: ``(θ_j, δ_j) ~ N(μ, 1/(2·ability_l2))`` with ``μ`` learned.
  The penalty does not grow with an expert's number of outcomes, so an expert measured on few
  queries (a new expert's profile, ``RoutingData.observed``) stays close to the population and
  one measured on many is free to differ.

Predicted quality is the probability mapped back to the outcome scale. Uncertainty
(``gives_uncertainty``) is a Laplace approximation: the posterior variance of the logit from
the difficulty head and of the expert's ability ``δ_j`` (the discrimination terms are held
fixed), mapped to the quality scale by the delta method.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from coe.routers.base import QueryBatch, Router, RouterParams, register_router


class IrtParams(RouterParams):
    dim: int = Field(2, ge=0, le=64, description="Dimensions of the ability / discrimination vectors.")
    l2: float = Field(100.0, gt=0, description="L2 penalty on the difficulty and discrimination heads.")
    ability_l2: float = Field(1.0, gt=0, description="Precision of the population prior on expert abilities.")
    max_iter: int = Field(300, ge=10, le=10_000, description="L-BFGS iterations.")
    seed: int = 0


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@register_router("irt")
class IrtRouter(Router):
    Params = IrtParams
    gives_uncertainty = True
    cv_grid = {"dim": [1, 4], "l2": [10.0, 100.0, 1000.0]}

    def __init__(self, params=None) -> None:
        super().__init__(params)
        self.A = np.zeros((0, 0))          # [D, K] discrimination head
        self.a0 = np.zeros(0)              # [K]
        self.w = np.zeros(0)               # [D] difficulty head
        self.c = np.zeros(1)               # [1]
        self.theta = np.zeros((0, 0))      # [M, K] ability vectors
        self.delta = np.zeros(0)           # [M] overall abilities
        self.bounds = np.array([0.0, 1.0])
        self.cov_b = np.zeros((0, 0))      # [D+1, D+1] Laplace covariance of (w, c)
        self.var_delta = np.zeros(0)       # [M] Laplace variance of δ

    # -- fitting ----------------------------------------------------------------------------
    def fit(self, data, embeddings, ctx=None) -> IrtRouter:
        from scipy.optimize import minimize

        self._set_experts(data)
        x = np.asarray(embeddings, dtype=np.float64)                       # [N, D]
        y = np.asarray(data.quality, dtype=np.float64)                     # [N, M]
        mask = np.ones_like(y, dtype=bool) if getattr(data, "observed", None) is None else np.asarray(data.observed)
        lo, hi = float(y[mask].min()), float(y[mask].max())
        self.bounds = np.array([lo, hi if hi > lo else lo + 1.0])
        t = np.where(mask, (y - lo) / (self.bounds[1] - lo), 0.0)          # [N, M] targets in 0..1
        m_f = mask.astype(np.float64)
        n, d = x.shape
        m, k = y.shape[1], self.params.dim
        l2, al2 = self.params.l2, self.params.ability_l2
        sizes = [d * k, k, d, 1, m * k, m, k, 1]   # A, a0, w, c, θ, δ, μθ, μδ

        def unpack(v):
            out, pos = [], 0
            for s in sizes:
                out.append(v[pos:pos + s])
                pos += s
            a_, a0, w, c, th, de, mth, mde = out
            return a_.reshape(d, k), a0, w, c, th.reshape(m, k), de, mth, mde

        def loss_grad(v):
            a_, a0, w, c, th, de, mth, mde = unpack(v)
            disc = x @ a_ + a0                                             # [N, K]
            b = x @ w + c[0]                                               # [N]
            z = disc @ th.T + de[None, :] - b[:, None]                     # [N, M]
            p = _sigmoid(z)
            # Bernoulli log-likelihood with fractional targets, numerically stable
            nll = np.sum(m_f * (np.logaddexp(0.0, z) - t * z))
            r = m_f * (p - t)                                              # [N, M] dNLL/dz
            dth, dde = th - mth, de - mde[0]
            loss = nll + l2 * (np.sum(a_ * a_) + np.sum(w * w)) + al2 * (np.sum(dth * dth) + np.sum(dde * dde))
            g_disc = r @ th                                                # [N, K]
            g_b = -r.sum(axis=1)                                           # [N]
            grads = [
                x.T @ g_disc + 2 * l2 * a_, g_disc.sum(axis=0),
                x.T @ g_b + 2 * l2 * w, np.array([g_b.sum()]),
                r.T @ disc + 2 * al2 * dth, r.sum(axis=0) + 2 * al2 * dde,
                -2 * al2 * dth.sum(axis=0), np.array([-2 * al2 * dde.sum()]),
            ]
            return loss, np.concatenate([g.ravel() for g in grads])

        rng = np.random.default_rng(self.params.seed)
        rate = np.clip((t * m_f).sum(axis=0) / np.maximum(m_f.sum(axis=0), 1), 0.02, 0.98)
        init = [
            0.01 * rng.standard_normal(d * k), np.full(k, 0.1), np.zeros(d), np.zeros(1),
            0.1 * rng.standard_normal(m * k), np.log(rate / (1 - rate)), np.zeros(k), np.zeros(1),
        ]
        res = minimize(loss_grad, np.concatenate(init), jac=True, method="L-BFGS-B",
                       options={"maxiter": self.params.max_iter})
        a_, a0, w, c, th, de, _mth, _mde = unpack(res.x)
        self.A, self.a0, self.w, self.c = a_, a0, w, c.copy()
        self.theta, self.delta = th, de
        # Laplace approximation around the optimum (difficulty head and δ; discrimination fixed)
        p = _sigmoid(self._logits(x))
        s = m_f * p * (1 - p)                                              # [N, M] Fisher weights
        x1 = np.hstack([x, np.ones((n, 1))])                               # [N, D+1]
        prec = (x1 * s.sum(axis=1)[:, None]).T @ x1 + 2 * l2 * np.eye(d + 1)
        prec[d, d] += 1e-6 - 2 * l2                                        # c is unpenalised (Σ s > 0 keeps it invertible)
        self.cov_b = np.linalg.inv(prec)
        self.var_delta = 1.0 / (s.sum(axis=0) + 2 * al2)
        self.notes = {"iterations": int(res.nit), "converged": bool(res.success), "nll": float(res.fun),
                      "observed": int(mask.sum())}
        return self

    # -- scoring ----------------------------------------------------------------------------
    def _logits(self, x: np.ndarray) -> np.ndarray:
        disc = x @ self.A + self.a0                                        # [B, K]
        b = x @ self.w + self.c[0]                                         # [B]
        return disc @ self.theta.T + self.delta[None, :] - b[:, None]     # [B, M]

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """P(correct) ``[B, M]`` on the 0..1 scale (before mapping to the outcome range)."""
        return _sigmoid(self._logits(np.asarray(embeddings, dtype=np.float64)))

    def score(self, batch: QueryBatch):
        x = np.asarray(batch.embeddings, dtype=np.float64)                 # [B, D]
        p = _sigmoid(self._logits(x))                                      # [B, M]
        lo, hi = self.bounds
        x1 = np.hstack([x, np.ones((len(x), 1))])
        var_b = np.einsum("bi,ij,bj->b", x1, self.cov_b, x1)               # [B]
        sd_logit = np.sqrt(np.clip(var_b[:, None] + self.var_delta[None, :], 0, None))
        return self._scores(lo + (hi - lo) * p, (hi - lo) * p * (1 - p) * sd_logit)

    def state(self):
        return {
            "A": self.A, "a0": self.a0, "w": self.w, "c": self.c, "theta": self.theta, "delta": self.delta,
            "bounds": self.bounds, "cov_b": self.cov_b, "var_delta": self.var_delta,
        }

    def set_state(self, arrays) -> None:
        for key in ("A", "a0", "w", "c", "theta", "delta", "bounds", "cov_b", "var_delta"):
            setattr(self, key, np.asarray(arrays[key], dtype=np.float64))
