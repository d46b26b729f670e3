"""A training run's state in checkpoints: what the trainer saves, how many it keeps, where a
resume starts. The file format and its safety are checkpoint.py's."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import MissingFileError, TrainingDiverged
from .checkpoint import (FORMAT, VERSION, atomic_save, latest_checkpoint, load_checkpoint, rng_state,
                         set_rng_state)
from .distributed import broadcast_buffers


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
    newest `keep` are deleted."""

    def __init__(self, *, output_dir: Path, keep: int, is_main: bool, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
                 criterion: nn.Module, metadata: dict, log: Callable[[str], None]):
        self.output_dir, self.keep, self.is_main, self.log = Path(output_dir), keep, is_main, log
        self.model, self.metadata = model, metadata
        self.parts = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "criterion": criterion}

    def save(self, name: str, *, iteration: int, samples_seen: int, bad_steps: int) -> Path:
        """Writes output_dir/name atomically (rank 0; the weights are the same on every rank).
        Refuses (TrainingDiverged) to write weights that are not finite."""
        path = self.output_dir / name
        broadcast_buffers(self.model)
        state = self.model.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingDiverged(f"not writing {path}: non-finite values in {bad[:5]}")
        if not self.is_main:
            return path
        # plain data only (see checkpoint.py): loadable with weights_only=True
        atomic_save({"format": FORMAT, "version": VERSION, "model": state,
                     **{key: part.state_dict() for key, part in self.parts.items()},
                     "iteration": iteration, "samples_seen": samples_seen, "bad_steps": bad_steps,
                     "rng": rng_state(), **self.metadata}, path)
        periodic = sorted(self.output_dir.glob("model_[0-9]*.pth"))
        for old in periodic[: max(0, len(periodic) - self.keep)]:
            old.unlink()
        return path

    def load(self, path: Path) -> dict:
        """Restores the model, its companions and the RNG state from `path`; returns the
        checkpoint's counters ("iteration", and "samples_seen", "bad_steps" where written)."""
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        for key, part in self.parts.items():
            if key != "scaler" or state[key]:  # the scaler's is empty when written without AMP
                part.load_state_dict(state[key])
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at iteration {int(state['iteration'])}")
        return {key: int(state[key]) for key in ("iteration", "samples_seen", "bad_steps") if key in state}
