"""The time budget's arithmetic, on a hand-made clock."""
from __future__ import annotations

from retinanet.engine.budget import RESERVE, TimeBudget


def test_chosen_length_fits_training_and_evaluations_in_the_budget():
    # 10 s of set-up, then 0.5 s per step; evaluations of 4 s every 100 steps and one at the end
    budget = TimeBudget(300.0, start_time=0.0, eval_period=100, warmup_iters=5, measure_iters=20)
    clock = 10.0
    for iteration in range(1, 26):
        step = 2.0 if iteration <= 5 else 0.5  # slow first steps are not measured
        clock += step
        if budget.observe(iteration, clock, step):
            break
    assert iteration == 25
    chosen = budget.choose(iteration, clock, eval_seconds=4.0)
    assert budget.seconds_per_iter == 0.5
    # left after step 25: 0.95 x (300 - 30) - 4 (final evaluation) = 252.5 s at 0.5 + 4/100 s
    # per step -> 467 steps
    assert chosen == 25 + 467
    total = clock + 467 * 0.5 + (chosen // 100) * 4.0 + 4.0
    # the reserve left over, within one step and one evaluation
    assert total <= 300.0 and abs(300.0 - total - RESERVE * 270) < 0.54 + 4.0
    assert not budget.observe(26, clock + 0.5, 0.5)  # the next plan is 50 steps later
    assert [i for i in range(27, 126) if budget.observe(i, clock, 0.5)] == [75, 125]


def _simulate(budget: TimeBudget, seconds_of_step, max_iter: int = 10**6) -> tuple[int, float]:
    """Steps until the budget's plan ends the run: (iterations, the clock at the end)."""
    clock, iteration, end = 0.0, 0, max_iter
    while iteration < end:
        iteration += 1
        step = seconds_of_step(iteration)
        clock += step
        if budget.observe(iteration, clock, step):
            end = budget.choose(iteration, clock, **({} if budget.chosen else {"eval_seconds": 0.0}))
    return iteration, clock


def test_a_misjudged_start_is_corrected_by_the_later_plans():
    # the machine was busy while steps 6-25 were timed (1.0 s), then ran at its speed (0.5 s)
    budget = TimeBudget(600.0, start_time=0.0, eval_period=0, warmup_iters=5, measure_iters=20)
    iterations, clock = _simulate(budget, lambda i: 1.0 if i <= 25 else 0.5)
    assert budget.first_choice < 650  # planned at 1 s per step
    # the later plans use the time really left: the run ends within a step of its reserve
    assert 600.0 * (1 - RESERVE) - 1.0 <= clock <= 600.0 and iterations > 1000


def test_a_machine_that_slows_down_still_ends_within_the_budget():
    budget = TimeBudget(600.0, start_time=0.0, eval_period=0, warmup_iters=5, measure_iters=20)
    iterations, clock = _simulate(budget, lambda i: 0.5 if i <= 600 else 0.75)
    assert budget.first_choice > iterations  # the first plan assumed 0.5 s to the end
    assert clock <= 600.0 and clock > 600.0 * (1 - 2 * RESERVE)


def test_a_budget_already_spent_trains_no_further_and_resume_measures_from_its_start():
    budget = TimeBudget(5.0, start_time=0.0, eval_period=0, warmup_iters=1, measure_iters=2)
    assert [budget.observe(i, float(i - 100), 1.0) for i in (101, 102, 103)] == [False, False, True]  # resumed at 100
    assert budget.choose(103, 3.0, eval_seconds=2.0) == 103
    assert budget.steps_left(3.0) == 0 and "max_iter 103" in budget.describe(1000)


def test_checkpoints_are_counted():
    budget = TimeBudget(100.0, start_time=0.0, eval_period=0, checkpoint_period=10, warmup_iters=1, measure_iters=1)
    budget.observe(1, 1.0, 1.0)
    assert budget.observe(2, 2.0, 1.0)
    # 0.95 x 98 - 0 - 2 (final save) = 91.1 s at 1 + 2/10 s per step -> 75 steps
    assert budget.choose(2, 2.0, eval_seconds=0.0, save_seconds=2.0) == 2 + 75
