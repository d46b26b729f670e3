"""train.time_budget_s: the run's length chosen from its measured speed, so that training, the
periodic evaluations and the final one fit the budget on whatever machine runs it."""
from __future__ import annotations

import math
from typing import Optional


# Of the time left at each plan, the share kept back: later steps can run slower than the
# measured ones (checkpoint writes, logging, a busier machine).
RESERVE = 0.05


class TimeBudget:
    """`budget.observe(iteration, now, step_seconds)` after each step returns True when a plan is
    due; then `budget.choose(iteration, now, ...)` gives the run's max_iter.

    The first plan comes after `warmup_iters` + `measure_iters` steps (the first steps pay for
    allocation and compilation, so they are not timed); the run then plans again every
    `replan_every` steps, from the speed of the steps since the last plan and the time really
    left: a speed misjudged over the first few seconds (a machine busy for a moment) is corrected,
    and a machine that slows down later still ends within its budget (as ultralytics' `time=`
    re-plans after every epoch). With s seconds
    per step, E the seconds of one evaluation and C of one checkpoint (`eval_seconds`,
    `save_seconds`, measured by the caller for the first plan), P and Q the evaluation and
    checkpoint periods, the n steps left satisfy
    elapsed + n s + (n / P) E + (n / Q) C + E + C <= budget - RESERVE x (what is left).
    """

    def __init__(self, budget_s: float, *, start_time: float, eval_period: int, checkpoint_period: int = 0,
                 warmup_iters: int = 5, measure_iters: int = 20, replan_every: int = 50):
        self.budget_s, self.start_time, self.eval_period = float(budget_s), start_time, int(eval_period)
        self.checkpoint_period = int(checkpoint_period)
        self.warmup_iters, self.measure_iters, self.replan_every = warmup_iters, measure_iters, replan_every
        self._first: Optional[int] = None  # the iteration the run (or the resumed part) began at
        self._timed_steps, self._timed_seconds = 0, 0.0  # since the last plan
        self.seconds_per_iter: Optional[float] = None
        self.eval_seconds = self.save_seconds = 0.0
        self.timed_steps = 0  # the steps the last plan's speed was measured over
        self.chosen: Optional[int] = None
        self.first_choice: Optional[int] = None

    def observe(self, iteration: int, now: float, step_seconds: float) -> bool:
        """After step `iteration`, which took `step_seconds` (data included): is a plan due?"""
        if self._first is None:
            self._first = iteration - 1
        done = iteration - self._first
        if done <= self.warmup_iters:
            return False
        self._timed_steps += 1
        self._timed_seconds += step_seconds
        first_plan = self.warmup_iters + self.measure_iters
        return done == first_plan or (done > first_plan and (done - first_plan) % self.replan_every == 0)

    def choose(self, iteration: int, now: float, eval_seconds: Optional[float] = None,
               save_seconds: Optional[float] = None) -> int:
        """The run's max_iter from the speed so far; `eval_seconds` and `save_seconds` are kept
        from the first plan when not given again."""
        if eval_seconds is not None:
            self.eval_seconds = float(eval_seconds)
        if save_seconds is not None:
            self.save_seconds = float(save_seconds)
        self.seconds_per_iter = self._timed_seconds / self._timed_steps
        self.timed_steps, self._timed_steps, self._timed_seconds = self._timed_steps, 0, 0.0
        self.chosen = iteration + self.steps_left(now)
        if self.first_choice is None:
            self.first_choice = self.chosen
        return self.chosen

    def steps_left(self, now: float) -> int:
        """Steps that fit in what is left of the budget after this one (at least 0)."""
        left = (1 - RESERVE) * (self.budget_s - (now - self.start_time)) - self.eval_seconds - self.save_seconds
        per_step = (self.seconds_per_iter + (self.eval_seconds / self.eval_period if self.eval_period else 0.0)
                    + (self.save_seconds / self.checkpoint_period if self.checkpoint_period else 0.0))
        return max(0, math.floor(left / per_step))

    def describe(self, configured_max_iter: int) -> str:
        return (f"time budget {self.budget_s:g} s (train.time_budget_s): {self.seconds_per_iter:.3f} s per "
                f"iteration, {self.eval_seconds:.1f} s per evaluation, {self.save_seconds:.1f} s per checkpoint "
                f"-> max_iter {self.chosen} "
                f"(train.max_iter {configured_max_iter}; the schedule's steps scaled alike; "
                f"planned again every {self.replan_every} iterations)")

    def describe_change(self, previous: int) -> str:
        return (f"time budget: max_iter {previous} -> {self.chosen} "
                f"({self.seconds_per_iter:.3f} s per iteration over the last {self.timed_steps} steps)")
