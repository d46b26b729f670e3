"""Recovery under `torchrun --max-restarts N`: when a rank dies, torchrun stops the group and starts
it again (TORCHELASTIC_RESTART_COUNT > 0); the restarted ranks resume from the newest checkpoint
this job wrote, and a failure that a restart would only repeat (the user's errors, exit 2; a
diverged run, exit 1) ends every later attempt at once.

Both facts live in the torchrun agent's key-value store (the c10d store at MASTER_ADDR:MASTER_PORT
when TORCHELASTIC_USE_AGENT_STORE is set): it outlives the workers, is shared by every node, and is
gone with the job, so a new launch never reads an old job's state. Outside torchrun, and with a
rendezvous backend without an agent store, every function here is a no-op (restarts then resume
with `--resume auto`).
"""
from __future__ import annotations

import datetime
import json
import os
from typing import Callable, Optional

import torch.distributed as dist

_CHECKPOINT_KEY = "retinanet/last_checkpoint"
_FAILURE_KEY = "retinanet/failure_that_repeats"
_store: Optional[dist.Store] = None


def restart_count() -> int:
    """Which attempt of the torchrun job this process belongs to: 0 for the first (and outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _job_store() -> Optional[dist.Store]:
    """A client of the torchrun agent's store, None outside torchrun or without an agent store."""
    global _store
    if _store is None and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        _store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                               is_master=False, timeout=datetime.timedelta(seconds=60))
    return _store


def attempt_store() -> Optional[dist.Store]:
    """The job store under a prefix of this attempt's own, for init_process_group: the agent keeps
    one store for the whole job, and ranks of a restarted group would otherwise read the
    addresses the dead group left in it and fail to connect."""
    store = _job_store()
    return None if store is None else dist.PrefixStore(f"retinanet/attempt_{restart_count()}", store)


def _read(key: str) -> Optional[str]:
    store = _job_store()
    if store is None or not store.check([key]):
        return None
    return store.get(key).decode()


def checkpoint_written(path: os.PathLike | str) -> None:
    """Notes the newest complete checkpoint of this job (rank 0, after its atomic rename)."""
    store = _job_store()
    if store is not None:
        store.set(_CHECKPOINT_KEY, str(path))


def resume_after_restart(resume: Optional[str], log: Callable[[str], None]) -> Optional[str]:
    """What this attempt resumes from: `resume` (the command line's) on the first attempt; on a
    restart the newest checkpoint the job wrote, else `resume` again (the first attempt died
    before its first checkpoint). Without an agent store a restart resumes with "auto"."""
    attempt = restart_count()
    if attempt == 0:
        return resume
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return "auto"
    newest = _read(_CHECKPOINT_KEY)
    start = newest or resume
    log(f"torchrun restart {attempt}: resuming from {start or 'the start, as the first attempt did'}"
        + (" (the newest checkpoint this job wrote)" if newest else ""))
    return start


def failure_repeats(message: str, exit_code: int) -> None:
    """Records a failure that a restart would only repeat, for restarted attempts to stop on."""
    store = _job_store()
    if store is not None and restart_count() < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")):
        store.set(_FAILURE_KEY, json.dumps({"message": message, "exit_code": exit_code,
                                            "attempt": restart_count()}))


def repeated_failure() -> Optional[tuple[str, int]]:
    """(message, exit code) of an earlier attempt's failure that would repeat, or None: a
    restarted attempt ends at once with it instead of failing the same way after its start-up."""
    if restart_count() == 0:
        return None
    record = _read(_FAILURE_KEY)
    if record is None:
        return None
    failure = json.loads(record)
    return (f"{failure['message']} (attempt {failure['attempt']} of this torchrun job failed so; "
            "a restart would repeat it: not retrying)", int(failure["exit_code"]))
