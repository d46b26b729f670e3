"""Best-checkpoint and patience logic."""
from __future__ import annotations

import pytest

from retinanet.engine.best import BestTracker


def test_best_and_patience():
    best = BestTracker(patience=2)
    aps = [0.10, 0.20, 0.15, 0.20, 0.25, 0.24, 0.23]
    improved = [best.update(ap, 100 * (i + 1)) for i, ap in enumerate(aps)]
    # equal is not better: the first iteration that reached an AP keeps it
    assert improved == [True, True, False, False, True, False, False]
    assert best.best_ap == 0.25 and best.best_iteration == 500 and best.stop
    assert "2 evaluations" in best.reason() and "iteration 500" in best.reason()


def test_patience_counts_in_a_row_and_zero_never_stops():
    best = BestTracker(patience=2)
    for i, ap in enumerate([0.3, 0.2, 0.4, 0.1]):
        best.update(ap, i)
    assert not best.stop  # one miss, a new best, one miss
    never = BestTracker(patience=0)
    for i in range(50):
        never.update(0.0, i)
    assert not never.stop


def test_state_round_trip_keeps_counting():
    best = BestTracker(patience=3)
    for i, ap in enumerate([0.3, 0.2, 0.1]):
        best.update(ap, i)
    resumed = BestTracker(patience=3)
    resumed.load_state_dict(best.state_dict())
    assert not resumed.stop
    resumed.update(0.25, 3)
    assert resumed.stop and resumed.best_iteration == 0


def test_negative_patience_is_refused():
    with pytest.raises(ValueError):
        BestTracker(patience=-1)
