"""train.time_budget_s: the run's length chosen from its measured speed, so that training, the
periodic evaluations and the final one fit the budget on whatever machine runs it."""
from __future__ import annotations

import math
from typing import Optional


# Of the time left at the choice, the share kept back: later steps run a few per cent slower than
# the measured ones (checkpoint writes, logging, a busier machine).
RESERVE = 0.05


class TimeBudget:
    """`budget.observe(iteration, now)` after each step returns True once, at the end of the
    measuring window; then `budget.choose(iteration, now, eval_seconds)` gives the run's max_iter.

    Speed is measured over `measure_iters` steps after `warmup_iters` (the first steps pay for
    allocation and compilation). With s seconds per step, E the seconds of one evaluation and C of
    one checkpoint (`eval_seconds`, `save_seconds`, measured by the caller), P and Q the evaluation
    and checkpoint periods, the n steps left satisfy
    elapsed + n s + (n / P) E + (n / Q) C + E + C <= budget - RESERVE x (what is left).
    """

    def __init__(self, budget_s: float, *, start_time: float, eval_period: int, checkpoint_period: int = 0,
                 warmup_iters: int = 5, measure_iters: int = 20):
        self.budget_s, self.start_time, self.eval_period = float(budget_s), start_time, int(eval_period)
        self.checkpoint_period = int(checkpoint_period)
        self.warmup_iters, self.measure_iters = warmup_iters, measure_iters
        self._first: Optional[int] = None  # the iteration the run (or the resumed part) began at
        self._mark: Optional[float] = None  # clock at the end of the warm-up
        self.seconds_per_iter: Optional[float] = None
        self.eval_seconds = self.save_seconds = 0.0
        self.chosen: Optional[int] = None

    def observe(self, iteration: int, now: float) -> bool:
        if self.seconds_per_iter is not None:
            return False
        if self._first is None:
            self._first = iteration - 1
        done = iteration - self._first
        if done == self.warmup_iters:
            self._mark = now
        elif done == self.warmup_iters + self.measure_iters:
            self.seconds_per_iter = (now - self._mark) / self.measure_iters
            return True
        return False

    def choose(self, iteration: int, now: float, eval_seconds: float, save_seconds: float = 0.0) -> int:
        self.eval_seconds, self.save_seconds = float(eval_seconds), float(save_seconds)
        self.chosen = iteration + self.steps_left(now)
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
                f"(train.max_iter {configured_max_iter}; the schedule's steps scaled alike)")
