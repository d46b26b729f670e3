"""Runs a tool whose checkpoint write is killed half-way, as a crash mid-write would:

    python tests/kill_in_save.py model_0000006.pth tools/train.py --config ...

The process SIGKILLs itself after atomic_save has written and fsynced that checkpoint's temp
file and before the rename. The fault injection lives here, in the tests, not in the package.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.engine import checkpoint  # noqa: E402

name, script, *args = sys.argv[1:]
real_replace = os.replace


def _replace_or_die(src, dst, *rest, **kwargs):
    if Path(dst).name == name:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *rest, **kwargs)


checkpoint.os = type(os)("os_with_kill")  # only the checkpoint module sees the patched replace
checkpoint.os.__dict__.update(os.__dict__, replace=_replace_or_die)
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
