"""AIQ, hull, APGR and CPT on hand-computed examples, and the zero router on the shared data."""

from __future__ import annotations

import pytest

from coe.routers.metrics import Anchors, aiq, apgr, cpt, nondecreasing_hull

COST = [1.0, 2.0, 3.0, 4.0]
QUAL = [0.5, 0.8, 0.7, 0.9]


def test_hull_drops_dominated_and_concave_points():
    hull = nondecreasing_hull(COST, QUAL)
    assert hull.tolist() == [[1.0, 0.5], [2.0, 0.8], [4.0, 0.9]]
    # (2, 0.6) lies below the chord from (1, 0.5) to (3, 0.9): not on the upper hull
    assert nondecreasing_hull([1, 2, 3], [0.5, 0.6, 0.9]).tolist() == [[1, 0.5], [3, 0.9]]


def test_aiq_by_hand():
    # area = 1 * (0.5 + 0.8) / 2 + 2 * (0.8 + 0.9) / 2 = 0.65 + 1.7 = 2.35 over a range of 3
    assert aiq(COST, QUAL, 1.0, 4.0) == pytest.approx(2.35 / 3)
    # flat beyond the last point
    assert aiq([1.0, 2.0], [0.5, 0.7], 1.0, 4.0) == pytest.approx((0.6 + 2 * 0.7) / 3)


def test_apgr_and_cpt_by_hand():
    anchors = Anchors.from_models(COST, QUAL)
    assert (anchors.c_weak, anchors.q_weak, anchors.c_strong, anchors.q_strong) == (1.0, 0.5, 4.0, 0.9)
    # normalised points (0, 0), (1/3, 0.75), (1, 1)
    assert apgr(COST, QUAL, anchors) == pytest.approx(1 / 3 * 0.375 + 2 / 3 * 0.875)
    assert cpt(COST, QUAL, anchors, 0.5) == pytest.approx(0.5 / 0.75 / 3)
    assert cpt(COST, QUAL, anchors, 0.8) == pytest.approx(1 / 3 + 0.2 * 2 / 3)
    assert cpt(COST, QUAL, anchors, 1.5) is None


@pytest.mark.parametrize("split, expected", [("winograde_test", 0.790), ("mbpp_test", 0.683)])
def test_zero_router_aiq_matches_the_reference(shared_data, split, expected):
    from coe.routers.datasets import load_routing_data
    from coe.routers.evaluate import Reference

    ref = Reference.from_data(load_routing_data(shared_data / "routing" / f"{split}.csv"))
    assert ref.zero_router_aiq == pytest.approx(expected, abs=6e-4)
    assert 0.86 < ref.oracle_quality <= 1.0
