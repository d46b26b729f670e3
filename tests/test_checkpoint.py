"""Checkpoints are plain data, written atomically and loaded with weights_only=True: a file
whose pickle runs code is refused wherever a user can hand it to us (--weights, model.weights,
--resume auto), old-format files only through the explicit upgrade tool, and --resume auto on
a first launch still starts from model.weights."""
from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from retinanet.config import config_from_yaml, load_config
from retinanet.engine import checkpoint
from retinanet.engine.checkpoint import (atomic_save, load_checkpoint, load_model_weights,
                                         rng_state, set_rng_state)
from retinanet.engine.trainer import Trainer
from retinanet.errors import CheckpointError

from conftest import REPO_ROOT

CONFIG = REPO_ROOT / "configs" / "shapes_R18.yaml"


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a hostile checkpoint could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _trained(tiny_config) -> Path:
    tiny_config.data.val.annotations = ""
    tiny_config.train.max_iter = 2
    Trainer(tiny_config, log=lambda s: None).train()
    return Path(tiny_config.output_dir) / "model_final.pth"


def _hostile_copy(src: Path, dst: Path, marker: Path) -> Path:
    state = torch.load(src, weights_only=True)
    state["config"] = _RunsCode(marker)
    torch.save(state, dst)
    return dst


def test_a_trainer_checkpoint_is_plain_data_with_its_config_and_classes(tiny_config):
    path = _trained(tiny_config)
    state = torch.load(path, weights_only=True)  # raises on anything but plain data
    assert state["format"] == "retinanet-checkpoint" and state["version"] == 2
    resolved = copy.deepcopy(tiny_config)
    resolved.model.num_classes = 5  # what the trainer resolved from the dataset
    assert config_from_yaml(state["config"]) == resolved
    assert state["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    assert state["category_ids"] == [1, 2, 3, 4, 5]
    assert state["iteration"] == 2 and state["samples_seen"] == 2 * tiny_config.train.batch_size


def test_rng_state_round_trips_as_plain_data(tmp_path):
    atomic_save(rng_state(), tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.random(), np.random.rand(), torch.rand(())  # move every stream on
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_code_in_a_checkpoint_never_runs(tiny_config, tmp_path):
    good = _trained(tiny_config)
    marker = tmp_path / "code_ran"
    hostile = _hostile_copy(good, tmp_path / "hostile.pth", marker)

    # 1. tools/eval.py --weights: one line naming the file, exit 2, nothing run
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools/eval.py"), "--config",
                           str(Path(tiny_config.output_dir) / "config.yaml"), "--weights", str(hostile)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {hostile}: refused"), proc.stderr
    assert "upgrade_checkpoint.py" in lines[0]
    # 2. model.weights
    with pytest.raises(CheckpointError, match="refused"):
        Trainer(load_config(CONFIG, [f"model.weights={hostile}", *_same_run(tiny_config, tmp_path / "a")]),
                log=lambda s: None)
    # 3. found by --resume auto
    run = tmp_path / "b"
    run.mkdir()
    _hostile_copy(good, run / "model_0000004.pth", marker)
    with pytest.raises(CheckpointError, match=r"model_0000004\.pth: refused"):
        Trainer(load_config(CONFIG, _same_run(tiny_config, run)), resume="auto", log=lambda s: None)
    assert not marker.exists()


def _same_run(config, output_dir: Path) -> list[str]:
    return [f"data.train.images={config.data.train.images}",
            f"data.train.annotations={config.data.train.annotations}", "data.val.annotations=",
            f"output_dir={output_dir}", "data.num_workers=0", "model.fpn.channels=32",
            "model.head.num_convs=1", "model.head.gn_groups=8", "train.max_iter=2",
            "train.time_budget_s=0"]


def test_old_format_checkpoints_load_only_after_a_trusted_upgrade(tiny_config, tmp_path):
    """The format before plain data pickled the Config dataclass and numpy's RNG tuple."""
    good = _trained(tiny_config)
    old = torch.load(good, weights_only=True)
    old.pop("format"), old.pop("version")
    old["config"] = tiny_config
    old["rng"] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(old, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match=r"old\.pth: refused.*--trust"):
        load_checkpoint(tmp_path / "old.pth")

    tool = [sys.executable, str(REPO_ROOT / "tools/upgrade_checkpoint.py"), str(tmp_path / "old.pth"),
            "--output", str(tmp_path / "new.pth")]
    refused = subprocess.run(tool, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--trust" in refused.stderr and not (tmp_path / "new.pth").exists()
    upgraded = subprocess.run([*tool, "--trust"], capture_output=True, text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    new = load_checkpoint(tmp_path / "new.pth")
    assert config_from_yaml(new["config"]) == tiny_config
    assert all(torch.equal(new["model"][k], v) for k, v in old["model"].items())
    np.random.seed(1)
    set_rng_state(new["rng"])  # the converted numpy state is the one that was saved
    assert np.random.get_state()[2] == old["rng"]["numpy"][2]
    assert np.array_equal(np.random.get_state()[1], old["rng"]["numpy"][1])
    # and training resumes from it
    logs = []
    Trainer(config_from_yaml(new["config"]), resume=str(tmp_path / "new.pth"), log=logs.append)
    assert any("resumed from" in line for line in logs)


def test_resume_auto_on_a_first_launch_starts_from_model_weights(tiny_config, tmp_path):
    weights = _trained(tiny_config)
    logs = []
    trainer = Trainer(load_config(CONFIG, [f"model.weights={weights}", *_same_run(tiny_config, tmp_path / "new")]),
                      resume="auto", log=logs.append)
    assert any("no checkpoint" in line and f"starting from {weights}" in line for line in logs)
    saved = load_checkpoint(weights)["model"]
    assert trainer.iteration == 0
    assert all(torch.equal(v, saved[k]) for k, v in trainer.model.state_dict().items())
    # once the run has a checkpoint, --resume auto continues it instead
    trainer.train()
    logs.clear()
    resumed = Trainer(load_config(CONFIG, [f"model.weights={weights}", *_same_run(tiny_config, tmp_path / "new")]),
                      resume="auto", log=logs.append)
    assert resumed.iteration == 2 and any("resumed from" in line for line in logs)


def test_a_missing_resume_path_is_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume .*nowhere\.pth: checkpoint not found"):
        Trainer(tiny_config, resume=str(tmp_path / "nowhere.pth"), log=lambda s: None)


def test_weights_that_do_not_fit_name_the_key(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "w.pth")
    with pytest.raises(CheckpointError, match=r"w\.pth: weights do not fit"):
        load_model_weights(torch.nn.Linear(2, 2), tmp_path / "w.pth")


def test_atomic_save_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    atomic_save({"x": torch.ones(1)}, tmp_path / "c.pth")
    assert events == ["fsync-file", "rename", "fsync-dir"]
    assert torch.equal(load_checkpoint(tmp_path / "c.pth")["x"], torch.ones(1))
