"""The time budget's arithmetic, on a hand-made clock."""
from __future__ import annotations

from retinanet.engine.budget import TimeBudget


def test_chosen_length_fits_training_and_evaluations_in_the_budget():
    # 10 s of set-up, then 0.5 s per step; evaluations of 4 s every 100 steps and one at the end
    budget = TimeBudget(300.0, start_time=0.0, eval_seconds=4.0, eval_period=100, warmup_iters=5, measure_iters=20)
    clock, chosen = 10.0, None
    for iteration in range(1, 26):
        clock += 2.0 if iteration <= 5 else 0.5  # slow first steps are not measured
        result = budget.observe(iteration, clock)
        if result is not None:
            chosen = result
            break
    assert budget.seconds_per_iter == 0.5 and iteration == 25
    # left after step 25: 300 - 30 - 4 (final evaluation) = 266 s at 0.5 + 4/100 s per step -> 492
    assert chosen == 25 + 492
    total = clock + 492 * 0.5 + (chosen // 100) * 4.0 + 4.0
    assert total <= 300.0 and 300.0 - total < 0.54 + 4.0  # within one step and one evaluation
    assert budget.observe(26, clock + 0.5) is None  # chosen once


def test_a_budget_already_spent_trains_no_further_and_resume_measures_from_its_start():
    budget = TimeBudget(5.0, start_time=0.0, eval_seconds=2.0, eval_period=0, warmup_iters=1, measure_iters=2)
    assert [budget.observe(i, float(i)) for i in (101, 102, 103)] == [None, None, 103]  # resumed at 100
    assert budget.steps_left(3.0) == 0 and "max_iter 103" in budget.describe(1000)
