"""train.time_budget_s: the run's length chosen from its measured speed, so that training, the
periodic evaluations and the final one fit the budget on whatever machine runs it."""
from __future__ import annotations

import math
from typing import Optional


class TimeBudget:
    """`budget.observe(iteration, now)` after each step; it returns the chosen max_iter once, at
    the end of the measuring window, and None otherwise.

    Speed is measured over `measure_iters` steps after `warmup_iters` (the first steps pay for
    allocation and compilation). With s seconds per step, E the estimated seconds of one
    evaluation (`eval_seconds`, measured by the caller on real validation batches) and P the
    evaluation period, the n steps left satisfy elapsed + n s + (n / P) E + E <= budget.
    """

    def __init__(self, budget_s: float, *, start_time: float, eval_seconds: float, eval_period: int,
                 warmup_iters: int = 5, measure_iters: int = 20):
        self.budget_s, self.start_time = float(budget_s), start_time
        self.eval_seconds, self.eval_period = float(eval_seconds), int(eval_period)
        self.warmup_iters, self.measure_iters = warmup_iters, measure_iters
        self._first: Optional[int] = None  # the iteration the run (or the resumed part) began at
        self._mark: Optional[float] = None  # clock at the end of the warm-up
        self.seconds_per_iter: Optional[float] = None
        self.chosen: Optional[int] = None

    def observe(self, iteration: int, now: float) -> Optional[int]:
        if self.chosen is not None:
            return None
        if self._first is None:
            self._first = iteration - 1
        done = iteration - self._first
        if done == self.warmup_iters:
            self._mark = now
        elif done == self.warmup_iters + self.measure_iters:
            self.seconds_per_iter = (now - self._mark) / self.measure_iters
            self.chosen = iteration + self.steps_left(now)
            return self.chosen
        return None

    def steps_left(self, now: float) -> int:
        """Steps that fit in what is left of the budget after this one (at least 0)."""
        left = self.budget_s - (now - self.start_time) - self.eval_seconds
        per_step = self.seconds_per_iter + (self.eval_seconds / self.eval_period if self.eval_period else 0.0)
        return max(0, math.floor(left / per_step))

    def describe(self, configured_max_iter: int) -> str:
        return (f"time budget {self.budget_s:g} s (train.time_budget_s): {self.seconds_per_iter:.3f} s per "
                f"iteration, {self.eval_seconds:.1f} s per evaluation -> max_iter {self.chosen} "
                f"(train.max_iter {configured_max_iter}; the schedule's steps scaled alike)")
