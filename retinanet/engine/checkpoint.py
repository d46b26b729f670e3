"""Checkpoints written atomically: a temp file in the same folder, fsync, then rename."""
from __future__ import annotations

import os
import random
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch


_TMP_SUFFIX = ".tmp"


def remove_interrupted_writes(folder: str | Path) -> list[str]:
    """Deletes the temp files of atomic_save calls that were killed before their rename (the
    checkpoint they were replacing is intact); returns their names."""
    stale = sorted(Path(folder).glob(f".*.pth.*{_TMP_SUFFIX}"))
    for path in stale:
        path.unlink()
    return [path.name for path in stale]


# Tests set this to a checkpoint's file name: the process then kills itself (SIGKILL) after
# writing that checkpoint's temp file and before the rename, as a crash mid-write would.
KILL_IN_SAVE = "RETINANET_KILL_IN_SAVE"


def atomic_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if os.environ.get(KILL_IN_SAVE) == path.name:  # fault injection for the resume tests
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # RNG states hold numpy objects, so this is a full unpickle: load only checkpoints you trust.
    return torch.load(path, map_location="cpu", weights_only=False)


def load_model_weights(model: torch.nn.Module, path: str | Path, *,
                       skip_mismatched: bool = False) -> list[str]:
    """Loads a trainer checkpoint ({"model": ...}) or a bare state dict into `model`.

    Every key must exist on both sides. A shape mismatch is an error, or with `skip_mismatched`
    (fine-tuning to another class count) the parameter keeps its current value and its key is
    returned, so that the caller can say what was re-initialised.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict or a checkpoint holding 'model'")
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched and not skip_mismatched:
        key = mismatched[0]
        raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, the model has "
                         f"{tuple(own[key].shape)} (check model.* in the config, e.g. num_classes)")
    result = model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    # BatchNorm's step counters are absent from FrozenBN checkpoints and unused in eval
    missing = [k for k in result.missing_keys
               if k not in mismatched and not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: weights do not fit this model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]} (check model.* in the config)")
    return mismatched


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    output_dir = Path(output_dir)
    final = output_dir / "model_final.pth"
    candidates = sorted(output_dir.glob("model_[0-9]*.pth"))
    if final.is_file():
        return final
    return candidates[-1] if candidates else None
