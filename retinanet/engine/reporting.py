"""What a run reports: log lines (rank 0 alone), tensorboard scalars and images, a progress bar at
a terminal, and each log window's mean losses, images/s, data time and ETA."""
from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .evaluator import METRIC_NAMES, evaluation_figures
from .plots import figure_array


class Reporter:
    """Rank 0 logs through `log` and writes tensorboard (after open_tensorboard); other ranks
    stay quiet. start() / add_step() / write_window() / stop() follow the training loop."""

    def __init__(self, *, is_main: bool, max_iter: int, log: Callable[[str], None] = print):
        self.is_main, self.max_iter, self._user_log = is_main, max_iter, log
        self.writer = _NoWriter()
        self.bar = None  # tqdm progress bar while training at a terminal

    def open_tensorboard(self, folder: Path) -> None:
        if self.is_main:
            self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None and self._user_log is print:
            self.bar.write(message)  # above the bar, which stays at the bottom
        else:
            self._user_log(message)

    def skipped_step(self, iteration: int, message: str) -> None:
        self.writer.add_scalar("train/skipped_step", 1, iteration)
        self.log(message)

    @property
    def eval_progress(self) -> bool:
        """Whether evaluation shows its own bar: at a terminal, outside the training bar."""
        return self.bar is None and self.is_main and _interactive()

    def start(self, iteration: int) -> None:
        self.bar = _progress_bar(self.is_main, total=self.max_iter, initial=iteration, desc="training",
                                 unit="it")
        self._start_time, self._start_iter = time.perf_counter(), iteration
        self._start_window(iteration, self._start_time)

    def add_step(self, losses: Optional[dict[str, Tensor]], images: int, data_time: float) -> None:
        """One step's detached losses (None: skipped; "steps" () 0 or 1 when its check is deferred),
        the images it trained on over all ranks and the seconds it waited for data."""
        if self.bar is not None:
            self.bar.update(1)
        self._images += images
        self._data_time += data_time
        if losses is not None:
            self._steps = self._steps + losses.pop("steps", 1)  # a tensor when deferred
            for key, value in losses.items():
                self._sums[key] = self._sums.get(key, 0) + value.detach()

    def write_window(self, iteration: int, lr: float) -> None:
        """The means since the last window to tensorboard and one log line (or the bar's postfix)."""
        now = time.perf_counter()
        steps = float(self._steps)  # one sync a window
        means = {k: float(v) / steps for k, v in self._sums.items()} if steps else {}
        data_time = self._data_time / (iteration - self._window_start)
        images_per_sec = self._images / max(now - self._window_time, 1e-9)
        eta = (now - self._start_time) / (iteration - self._start_iter) * (self.max_iter - iteration)
        self._start_window(iteration, now)
        self.writer.add_scalar("train/data_time", data_time, iteration)
        if not means:
            self.log(f"iter {iteration:>6}/{self.max_iter}  every step since the last line was skipped")
            return
        for key, value in means.items():
            self.writer.add_scalar(f"train/{key}", value, iteration)
        self.writer.add_scalar("train/lr", lr, iteration)
        self.writer.add_scalar("train/images_per_sec", images_per_sec, iteration)
        if self.bar is not None:  # the bar shows progress and ETA; the losses ride along
            self.bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.5f}", refresh=False)
        self.log(f"iter {iteration:>6}/{self.max_iter}  loss {means['loss']:.4f} "
                 f"(cls {means['loss_cls']:.4f} box {means['loss_box']:.4f})  lr {lr:.5f}  "
                 f"{images_per_sec:5.1f} img/s  data {1000 * data_time:.0f} ms  "
                 f"eta {datetime.timedelta(seconds=int(eta))}")

    def _start_window(self, iteration: int, now: float) -> None:
        self._sums: dict[str, Tensor] = {}
        self._steps, self._images, self._data_time = 0, 0, 0.0
        self._window_start, self._window_time = iteration, now

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def done(self) -> None:
        self.log(f"training done in {datetime.timedelta(seconds=int(time.perf_counter() - self._start_time))}")

    def evaluation(self, result: dict, drawn: list[tuple[int, np.ndarray]], iteration: int) -> None:
        """An evaluation's scores, validation loss and drawn images (see Validation)."""
        for name in METRIC_NAMES[:6]:
            self.writer.add_scalar(f"eval/{name}", result["metrics"][name], iteration)
        for name, ap in result["per_class"].items():
            self.writer.add_scalar(f"eval_per_class/AP/{name}", ap, iteration)
        if "val_loss" in result:
            for key, value in result["val_loss"].items():
                self.writer.add_scalar(f"val/{key}", value, iteration)
            loss = result["val_loss"]
            self.log(f"validation loss {loss['loss']:.4f} (cls {loss['loss_cls']:.4f} "
                     f"box {loss['loss_box']:.4f})")
        for image_id, image in drawn:  # every evaluation: predictions (colour) and truth (white)
            self.writer.add_image(f"val_images/{image_id}", image, iteration, dataformats="HWC")
        if self.is_main:  # the figures beside the PR curves, as images
            figures = evaluation_figures(result)
            for name in ("confusion_matrix", "per_class_ap"):
                self.writer.add_image(f"eval/{name}", figure_array(figures[name]), iteration, dataformats="HWC")


class _NoWriter:
    """Stands in for tensorboard's SummaryWriter where nothing is written: every call does nothing."""

    def __getattr__(self, name: str) -> Callable:
        return lambda *args, **kwargs: None


def _interactive() -> bool:
    """Progress bars only for a person at a terminal: not in CI logs or redirected output."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _progress_bar(is_main: bool, **kwargs) -> Optional[tqdm]:
    """A tqdm bar on rank 0 at a terminal, else None (one log line per log_period instead)."""
    if not (is_main and _interactive()):
        return None
    return tqdm(dynamic_ncols=True, **kwargs)
