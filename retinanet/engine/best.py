"""The best model so far by validation AP, and early stopping after `patience` evaluations
without improvement (train.patience), for runs that evaluate periodically (train.eval_period)."""
from __future__ import annotations

import math


class BestTracker:
    """`improved = best.update(ap, iteration)` after each periodic evaluation; `best.stop` once
    `patience` (> 0) evaluations in a row have not raised the best AP (0: never stops). Its
    state_dict() goes into checkpoints, so that a resumed run keeps counting."""

    def __init__(self, patience: int = 0):
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.patience = patience
        self.best_ap, self.best_iteration, self.since_best = -math.inf, -1, 0

    def update(self, ap: float, iteration: int) -> bool:
        """True when `ap` beats every earlier evaluation (then model_best.pth is written)."""
        if ap > self.best_ap:
            self.best_ap, self.best_iteration, self.since_best = ap, iteration, 0
            return True
        self.since_best += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def reason(self) -> str:
        return (f"AP has not improved for {self.since_best} evaluations (train.patience "
                f"{self.patience}); the best, AP {100 * self.best_ap:.2f} at iteration "
                f"{self.best_iteration}, is model_best.pth")

    def state_dict(self) -> dict:
        return {"best_ap": self.best_ap, "best_iteration": self.best_iteration, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best_ap, self.best_iteration = float(state["best_ap"]), int(state["best_iteration"])
        self.since_best = int(state["since_best"])
