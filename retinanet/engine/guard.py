"""The non-finite guard: a step whose loss or gradient is not finite leaves the weights, optimizer
state and BatchNorm statistics as they were; max_bad_steps such steps in a row stop the run."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import TrainingDiverged
from .distributed import all_reduce_max


class NonFiniteGuard:
    """Applies or skips the optimizer step once the gradients are in; `report(iteration, message)`
    hears of each skipped step. Immediate mode (CPU) reads each step's flag at once; with `defer`
    (CUDA, fused optimizer) nothing waits for the device: the optimizer skips on a device-side
    flag (found_inf), BatchNorm statistics are restored with a select, and settle() reads the
    flags once per log window."""

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 scheduler, use_amp: bool, defer: bool, max_bad_steps: int,
                 report: Callable[[int, str], None]):
        self.optimizer, self.scaler, self.scheduler = optimizer, scaler, scheduler
        self.use_amp, self.defer, self.max_bad_steps, self.report = use_amp, defer, max_bad_steps, report
        # Trainable BatchNorm updates its statistics in the forward pass; a skipped step restores them.
        self.bn_buffers = [buf for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                           for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
                           if buf is not None]
        self.bad_steps = 0  # consecutive skipped steps
        self._unsettled: list[tuple] = []  # deferred mode: (iteration, image ids, skip flag, losses)

    def snapshot(self) -> list[Tensor]:
        """The BatchNorm statistics before the forward pass, for step() to restore."""
        return [buf.clone() for buf in self.bn_buffers]

    def step(self, total: Tensor, grad_norm: Tensor, losses: dict[str, Tensor], saved_stats: list[Tensor],
             iteration: int, image_ids: Sequence[int]) -> Optional[dict[str, Tensor]]:
        """The optimizer and scheduler step of `iteration`, skipped when the loss `total` () or
        `grad_norm` () is not finite on any rank. Returns `losses`, None when skipped; deferred:
        `losses` (zeroed when skipped) with "steps" () 1 or 0."""
        # Under AMP an overflowing gradient is the scaler's business (it skips and lowers the scale).
        finite = torch.isfinite(total) & (torch.isfinite(grad_norm) | self.use_amp)
        # Every rank takes the same decision (DDP already shares non-finite gradients; a loss that
        # is non-finite on one rank only would otherwise desynchronise the AMP scalers).
        skip = all_reduce_max((~finite).float())  # () 1.0: skip this step
        if self.defer:
            return self._step_on_device(skip, losses, saved_stats, iteration, image_ids)
        if bool(skip):  # the step's one host sync (none in deferred mode)
            self.optimizer.zero_grad(set_to_none=True)
            for buf, saved in zip(self.bn_buffers, saved_stats):
                buf.copy_(saved)
            self._scheduler_step()
            self._count(iteration, image_ids, losses)
            return None
        self._count(iteration, image_ids, None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return losses

    def _step_on_device(self, skip: Tensor, losses: dict, saved_stats: list, iteration: int,
                        image_ids: Sequence[int]) -> dict:
        for buf, saved in zip(self.bn_buffers, saved_stats):
            buf.copy_(torch.where(skip > 0, saved, buf))
        if not self.use_amp:  # under AMP the scaler sets found_inf (a NaN loss gives NaN grads)
            self.optimizer.found_inf = skip
        try:
            self.scaler.step(self.optimizer)
        finally:
            if not self.use_amp:
                del self.optimizer.found_inf
        self.scaler.update()
        self._scheduler_step()
        self._unsettled.append((iteration, image_ids, skip, losses))
        kept = {key: torch.where(skip > 0, torch.zeros_like(value), value) for key, value in losses.items()}
        kept["steps"] = 1 - skip
        return kept

    def settle(self) -> None:
        """Reads the deferred flags (one host sync) and counts them as immediate mode does."""
        if not self._unsettled:
            return
        pending, self._unsettled = self._unsettled, []
        flags = torch.stack([skip for _, _, skip, _ in pending]).tolist()
        for (iteration, image_ids, _, losses), flag in zip(pending, flags):
            self._count(iteration, image_ids, losses if flag else None)

    def _scheduler_step(self) -> None:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" on a skipped step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # a skipped iteration still counts: the schedule stays on time

    def _count(self, iteration: int, image_ids: Sequence[int], skipped: Optional[dict]) -> None:
        """`skipped`: a skipped step's losses, None for a good step."""
        if skipped is None:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.report(iteration, f"iteration {iteration}: non-finite loss or gradient (loss_cls "
                    f"{float(skipped['loss_cls']):.4g}, loss_box {float(skipped['loss_box']):.4g}, "
                    f"grad norm {float(skipped['grad_norm']):.4g}); step skipped, weights unchanged; "
                    f"image ids {image_ids}")
        if self.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_steps} consecutive steps with a non-finite loss or gradient (the last at "
                f"iteration {iteration}, image ids {image_ids}); stopping. Check the data with "
                "tools/check_dataset.py, lower train.optimizer.lr or set train.clip_grad_norm")
