"""A training run's state in checkpoints: what the trainer saves, how many it keeps, where a
resume starts. The file format and its safety are checkpoint.py's."""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import MissingFileError, TrainingDiverged
from .checkpoint import (FORMAT, VERSION, atomic_save, latest_checkpoint, load_checkpoint, rng_state,
                         set_rng_state)
from .distributed import broadcast_buffers
from .ema import ModelEMA


def find_resume(resume: str, output_dir: Path, *, weights: Optional[str],
                log: Callable[[str], None]) -> Optional[Path]:
    """The checkpoint `resume` names: a path, or "auto" for the newest one in output_dir (None
    when there is none yet: a first launch then starts like a run without --resume)."""
    if resume != "auto":
        if not Path(resume).is_file():
            raise MissingFileError(f"--resume {resume}: checkpoint not found")
        return Path(resume)
    path = latest_checkpoint(output_dir)
    if path is None:
        start = f"from {weights}" if weights else "from scratch"
        log(f"--resume auto: no checkpoint in {output_dir} yet, starting {start}")
    return path


class Checkpointer:
    """Saves and restores the model with its training companions (optimizer, scheduler, AMP
    scaler, criterion), the run's counters and the RNG state; `metadata` (config YAML, class
    names, category ids) rides along. Periodic checkpoints (model_<iteration>.pth) beyond the
    newest `keep` are deleted.

    With an `ema`, the file's "model" is the averaged weights (what evaluation, --weights and
    export read) and "model_raw" the training weights, with "ema" its update count."""

    def __init__(self, *, output_dir: Path, keep: int, is_main: bool, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                 criterion: nn.Module, metadata: dict, log: Callable[[str], None],
                 ema: Optional[ModelEMA] = None):
        self.output_dir, self.keep, self.is_main, self.log = Path(output_dir), keep, is_main, log
        self.model, self.metadata, self.ema = model, metadata, ema
        self.parts = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "criterion": criterion}

    def save(self, name: str, *, iteration: int, samples_seen: int, bad_steps: int,
             run: Optional[dict] = None) -> Path:
        """Writes output_dir/name atomically (rank 0; the weights are the same on every rank),
        with `run` (plain data: the run's own state, e.g. its best AP) under "run". Refuses
        (TrainingDiverged) to write weights that are not finite."""
        path = self.output_dir / name
        broadcast_buffers(self.model)
        weights = {"model": self.model.state_dict()}
        if self.ema is not None:
            weights = {"model": self.ema.module.state_dict(), "model_raw": weights["model"],
                       "ema": self.ema.state_dict()}
        bad = [k if entry == "model" else f"{entry}.{k}" for entry in ("model", "model_raw")
               for k, v in weights.get(entry, {}).items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingDiverged(f"not writing {path}: non-finite values in {bad[:5]}")
        if not self.is_main:
            return path
        # plain data only (see checkpoint.py): loadable with weights_only=True
        atomic_save({"format": FORMAT, "version": VERSION, **weights,
                     **{key: part.state_dict() for key, part in self.parts.items()},
                     "iteration": iteration, "samples_seen": samples_seen, "bad_steps": bad_steps,
                     "run": run or {}, "rng": rng_state(), **self.metadata}, path)
        periodic = sorted(self.output_dir.glob("model_[0-9]*.pth"))
        for old in periodic[: max(0, len(periodic) - self.keep)]:
            old.unlink()
        return path

    def estimate_seconds(self) -> float:
        """Seconds a save will take: this state serialised in memory, timed, doubled for the
        write and fsync (train.time_budget_s)."""
        start = time.perf_counter()
        torch.save({"model": self.model.state_dict(), **{k: p.state_dict() for k, p in self.parts.items()},
                    **({"ema": self.ema.module.state_dict()} if self.ema is not None else {})}, io.BytesIO())
        return 2 * (time.perf_counter() - start)

    def load(self, path: Path) -> dict:
        """Restores the model (and EMA), its companions and the RNG state from `path`; returns the
        checkpoint's counters ("iteration", and "samples_seen", "bad_steps" where written) and
        "run" (save's `run`, {} when absent)."""
        state = load_checkpoint(path)
        self.model.load_state_dict(state.get("model_raw", state["model"]))
        if self.ema is not None:  # a checkpoint without EMA starts the average at its weights
            self.ema.module.load_state_dict(state["model"])
            self.ema.load_state_dict(state.get("ema", {"updates": 0}))
        for key, part in self.parts.items():
            if key != "scaler" or state[key]:  # the scaler's is empty when written without AMP
                part.load_state_dict(state[key])
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at iteration {int(state['iteration'])}")
        counters = {key: int(state[key]) for key in ("iteration", "samples_seen", "bad_steps") if key in state}
        return {**counters, "run": state.get("run", {})}
