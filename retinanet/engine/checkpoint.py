"""Checkpoints: plain data (tensors, numbers, strings, lists, dicts), written atomically and
read with `torch.load(weights_only=True)`, so that a file a user hands us cannot run code.

A trainer checkpoint holds {"format", "version", "model", "optimizer", "scheduler", "scaler",
"criterion", "iteration", "samples_seen", "bad_steps", "rng", "config" (YAML text),
"class_names", "category_ids"}; weights files may also be bare state dicts (torchvision's).
Files written before version 2 pickled the Config dataclass and numpy's RNG state: they are
refused, naming the file, until `tools/upgrade_checkpoint.py --trust` rewrites them.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..config import Config, config_to_yaml
from ..errors import CheckpointError, MissingFileError
from ..weights import load_checkpoint, load_model_weights  # noqa: F401  (re-exported)

FORMAT = "retinanet-checkpoint"
VERSION = 2
_TMP_SUFFIX = ".tmp"


def remove_interrupted_writes(folder: str | Path) -> list[str]:
    """Deletes the temp files of atomic_save calls that were killed before their rename (the
    checkpoint they were replacing is intact); returns their names."""
    stale = sorted(Path(folder).glob(f".*.pth.*{_TMP_SUFFIX}"))
    for path in stale:
        path.unlink()
    return [path.name for path in stale]


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, rename over `path`, fsync the folder:
    readers see the old file or the new one, and after a power loss the rename is not lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename is an entry of the folder: durable only once the folder is
    finally:
        os.close(fd)


# RNG states as plain data: Python's as a list of ints, numpy's key array as a tensor.
def _plain_python_rng(state: tuple) -> dict:
    version, words, gauss = state
    return {"version": version, "state": list(words), "gauss_next": gauss}


def _plain_numpy_rng(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"bit_generator": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def rng_state() -> dict:
    state = {"python": _plain_python_rng(random.getstate()),
             "numpy": _plain_numpy_rng(np.random.get_state()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    output_dir = Path(output_dir)
    final = output_dir / "model_final.pth"
    candidates = sorted(output_dir.glob("model_[0-9]*.pth"))
    if final.is_file():
        return final
    return candidates[-1] if candidates else None


def upgrade_checkpoint(src: str | Path, dst: str | Path) -> dict:
    """Rewrites an old-format checkpoint (pickled Config and numpy RNG state) as plain data.

    This unpickles `src` in full, which runs whatever code the file carries: call it only on
    files you wrote yourself or otherwise trust. Returns the rewritten checkpoint."""
    src = Path(src)
    if not src.is_file():
        raise MissingFileError(f"checkpoint not found: {src}")
    old = torch.load(src, map_location="cpu", weights_only=False)
    if not isinstance(old, dict):
        raise CheckpointError(f"{src}: not a checkpoint (a {type(old).__name__}, expected a dict)")
    new = dict(old)
    if isinstance(old.get("config"), Config):
        new["config"] = config_to_yaml(old["config"])
    rng = old.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        new["rng"] = dict(rng, python=_plain_python_rng(rng["python"]),
                          numpy=_plain_numpy_rng(rng["numpy"]))
    if "model" in new:
        new.setdefault("format", FORMAT)
        new["version"] = VERSION
    atomic_save(new, dst)
    load_checkpoint(dst)  # what it wrote is plain data, or this raises
    return new
