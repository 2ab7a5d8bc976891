"""routers/profile_data.py's fill of unmeasured cells: the other experts' outcomes on the same row,
then the expert's own nearest measured rows."""

import numpy as np

from coe.routers.profile_data import impute_missing, peer_baseline


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(size=n)
    others = np.stack([(difficulty + rng.normal(scale=0.3, size=n) < t).astype(float) for t in (-0.5, 0.0, 0.5)],
                      axis=1)
    new = (difficulty < 0.2).astype(float)             # follows the items' difficulty, as the others do
    emb = rng.normal(size=(n, 16)).astype(np.float32)  # says nothing about the outcomes
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return np.column_stack([others, new]), emb


def test_unmeasured_cells_follow_the_other_experts_on_the_same_row():
    quality, emb = _data()
    truth = quality[:, 3].copy()
    observed = np.ones(quality.shape, dtype=bool)
    observed[30:, 3] = False                           # the new expert measured on 30 of 120 probes
    q, cost = quality.copy(), np.ones(quality.shape)
    impute_missing(q, cost, observed, emb)
    miss = ~observed[:, 3]
    peer_error = np.abs(q[miss, 3] - truth[miss]).mean()
    alone = quality[:, [3]].copy()                     # the same expert with no peer: its own kNN only
    impute_missing(alone, np.ones(alone.shape), observed[:, [3]], emb)
    own_error = np.abs(alone[miss, 0] - truth[miss]).mean()
    assert peer_error < 0.3
    assert peer_error < own_error - 0.1
    assert np.array_equal(q[observed], quality[observed])           # measured cells untouched
    assert q.min() >= 0.0 and q.max() <= 1.0


def test_without_peers_or_with_few_rows_the_baseline_is_the_mean():
    quality, _ = _data()
    measured = np.zeros(quality.shape, dtype=bool)
    measured[:50, 3] = True                            # nobody else measured on those rows
    assert np.allclose(peer_baseline(quality, measured, 3), quality[:50, 3].mean())
    measured[:, :3] = True
    measured[5:, 3] = False                            # 5 rows: too few to regress on
    assert np.allclose(peer_baseline(quality, measured, 3), quality[:5, 3].mean())


def test_unrelated_peers_leave_the_mean():
    rng = np.random.default_rng(1)
    quality = rng.integers(0, 2, size=(200, 4)).astype(float)   # nobody's outcome tells about another's
    measured = np.ones(quality.shape, dtype=bool)
    measured[40:, 3] = False
    base = peer_baseline(quality, measured, 3)
    assert np.ptp(base) < 0.2                          # leave-one-out keeps it close to the mean
