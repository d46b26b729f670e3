"""The time budget's arithmetic, on a hand-made clock."""
from __future__ import annotations

from retinanet.engine.budget import RESERVE, TimeBudget


def test_chosen_length_fits_training_and_evaluations_in_the_budget():
    # 10 s of set-up, then 0.5 s per step; evaluations of 4 s every 100 steps and one at the end
    budget = TimeBudget(300.0, start_time=0.0, eval_period=100, warmup_iters=5, measure_iters=20)
    clock = 10.0
    for iteration in range(1, 26):
        clock += 2.0 if iteration <= 5 else 0.5  # slow first steps are not measured
        if budget.observe(iteration, clock):
            break
    assert budget.seconds_per_iter == 0.5 and iteration == 25
    chosen = budget.choose(iteration, clock, eval_seconds=4.0)
    # left after step 25: 0.95 x (300 - 30) - 4 (final evaluation) = 252.5 s at 0.5 + 4/100 s
    # per step -> 467 steps
    assert chosen == 25 + 467
    total = clock + 467 * 0.5 + (chosen // 100) * 4.0 + 4.0
    # the reserve left over, within one step and one evaluation
    assert total <= 300.0 and abs(300.0 - total - RESERVE * 270) < 0.54 + 4.0
    assert not budget.observe(26, clock + 0.5)  # measured once


def test_a_budget_already_spent_trains_no_further_and_resume_measures_from_its_start():
    budget = TimeBudget(5.0, start_time=0.0, eval_period=0, warmup_iters=1, measure_iters=2)
    assert [budget.observe(i, float(i)) for i in (101, 102, 103)] == [False, False, True]  # resumed at 100
    assert budget.choose(103, 3.0, eval_seconds=2.0) == 103
    assert budget.steps_left(3.0) == 0 and "max_iter 103" in budget.describe(1000)


def test_checkpoints_are_counted():
    budget = TimeBudget(100.0, start_time=0.0, eval_period=0, checkpoint_period=10, warmup_iters=1, measure_iters=1)
    budget.observe(1, 1.0)
    assert budget.observe(2, 2.0)
    # 0.95 x 98 - 0 - 2 (final save) = 91.1 s at 1 + 2/10 s per step -> 75 steps
    assert budget.choose(2, 2.0, eval_seconds=0.0, save_seconds=2.0) == 2 + 75
