"""A rank that hangs stops the whole job: each rank times what it is waiting for (its data loader,
its step and the gradient all-reduce in it) and ends itself, naming its rank and the wait, when one
wait lasts longer than train.dist_timeout_s; torchrun then stops the other ranks."""
from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional


class Watchdog:
    """`with watchdog.waiting("its data loader", iteration): ...` bounds that wait to `timeout_s`.

    A thread sleeps until the current wait's deadline (not polling, so that the rank that hangs
    first is the one that reports); on expiry it prints one line to stderr and ends the process
    with exit code 1 (the main thread may be blocked in C code, where no exception reaches it).
    Disabled (`enabled=False`: one process) it only runs the block."""

    def __init__(self, *, timeout_s: float, rank: int, enabled: bool):
        self.timeout_s, self.rank, self.enabled = timeout_s, rank, enabled
        self._wait: Optional[tuple[str, int, float]] = None  # (what, iteration, started)
        self._changed = threading.Condition()
        if enabled:
            threading.Thread(target=self._watch, name="retinanet-watchdog", daemon=True).start()

    @contextmanager
    def waiting(self, what: str, iteration: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._changed:
            self._wait = (what, iteration, time.monotonic())
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._wait = None
                self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while True:
                if self._wait is None:
                    self._changed.wait()
                    continue
                what, iteration, started = self._wait
                left = started + self.timeout_s - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                sys.stderr.write(
                    f"error: rank {self.rank} waited {time.monotonic() - started:.1f} s for {what} "
                    f"(iteration {iteration}), longer than train.dist_timeout_s={self.timeout_s:g}; "
                    "ending the job, whose other ranks would wait for it. Check what that rank was "
                    "reading (a stalled file system, a dataset that blocks), or raise train.dist_timeout_s\n")
                sys.stderr.flush()
                os._exit(1)
