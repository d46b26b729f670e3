"""Runs a tool with a fault injected into the first attempt of a torchrun job, for the elastic
and hung-rank tests (the fault injection lives here, in the tests, not in the package):

    torchrun ... tests/faults.py tools/train.py --config ...      with FAULT set to one of
    kill@N   rank FAULT_RANK (default 1) SIGKILLs itself as it starts the step of iteration N
    hang@P   the rank that loads training stream position P blocks there, in its data loader
    nan@N    every rank's images are NaN from iteration N on (a run that diverges)

A restarted attempt (TORCHELASTIC_RESTART_COUNT > 0) runs without the fault. Each fault prints
`fault: ...` with its time.time() on stderr when it strikes.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.data.loader import StreamSeededDataset  # noqa: E402
from retinanet.engine.trainer import Trainer  # noqa: E402

kind, _, at = os.environ.get("FAULT", "").partition("@")
rank = int(os.environ.get("RANK", "0"))


def _say(what: str) -> None:
    sys.stderr.write(f"fault: rank {rank} {what} at {time.time():.3f}\n")
    sys.stderr.flush()


if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and kind:
    if kind == "kill":
        real_step = Trainer.step

        def step(self, batch):
            if self.iteration + 1 == int(at) and rank == int(os.environ.get("FAULT_RANK", "1")):
                _say(f"killed at iteration {at}")
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, batch)
        Trainer.step = step
    elif kind == "hang":
        real_getitem = StreamSeededDataset.__getitem__

        def getitem(self, key):
            if key[1] == int(at):
                _say(f"hangs in its data loader at stream position {at}")
                time.sleep(3600)
            return real_getitem(self, key)
        StreamSeededDataset.__getitem__ = getitem
    elif kind == "nan":
        real_step = Trainer.step

        def step(self, batch):
            if self.iteration + 1 >= int(at):
                batch.images.fill_(float("nan"))
            return real_step(self, batch)
        Trainer.step = step
    else:
        raise SystemExit(f"unknown FAULT {kind!r}")

script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
