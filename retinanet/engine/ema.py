"""Model EMA: an exponential moving average of the weights over the optimiser's steps, which
evaluation, the checkpoint's `model` entry and everything that reads it use when train.ema.enabled
(the average of the last few hundred steps' weights is smoother than the last one's)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """`ema.update(model)` after every optimiser step: ema = d_n ema + (1 - d_n) model for the n-th
    update, with d_n = min(decay, (1 + n) / (10 + n)), the warm-up of TensorFlow's
    ExponentialMovingAverage(num_updates), so that the random initialisation does not linger in
    the average of a short run. Every floating-point entry of the state dict is averaged
    (parameters and BatchNorm statistics); integer ones (step counters) are copied.

    `module` is the averaged copy of the model (eval mode, no gradients). The raw weights stay in
    the model; a checkpoint holds both, and `state_dict()` the update count, so that a resumed run
    continues the same average bit for bit.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = float(decay), 0

    def decay_at(self, updates: int) -> float:
        """d_n for the n-th update (n >= 1)."""
        return min(self.decay, (1.0 + updates) / (10.0 + updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Averages `model`'s current state (the module itself, not a DDP wrapper) into `module`."""
        self.updates += 1
        weight = 1.0 - self.decay_at(self.updates)
        averaged, current = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in averaged.items() if v.is_floating_point()]
        torch._foreach_lerp_([averaged[k] for k in floats], [current[k] for k in floats], weight)
        for key, value in averaged.items():
            if not value.is_floating_point():
                value.copy_(current[key])

    def state_dict(self) -> dict:
        """The counters a resumed run needs (the weights are saved as the checkpoint's model)."""
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
