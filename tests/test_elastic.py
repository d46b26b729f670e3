"""Faults under torchrun (gloo on CPU, 2 ranks): a rank killed mid-run under --max-restarts
restarts from the newest checkpoint and ends bit-identical to an uninterrupted run (also with
data workers and aspect-ratio grouping); a failure that a restart would repeat ends the job at
once; a rank that hangs ends the job within train.dist_timeout_s, naming itself. Faults are
injected by tests/faults.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from retinanet.data.loader import InfiniteSampler
from retinanet.data.shapes import generate_shapes_dataset
from retinanet.engine import elastic
from retinanet.engine.checkpoint import load_checkpoint

from conftest import REPO_ROOT, tiny_overrides

CONFIG = str(REPO_ROOT / "configs" / "shapes_R18.yaml")


def _torchrun(*overrides: str, max_restarts: int = 0, fault: str = "", timeout: int = 300
              ) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FAULT=fault)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         f"--max-restarts={max_restarts}", str(REPO_ROOT / "tests" / "faults.py"),
         str(REPO_ROOT / "tools" / "train.py"), "--config", CONFIG, "train.device=cpu", *overrides],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def mixed_orientation_dir(tmp_path_factory) -> Path:
    """16 training images, half landscape (96 x 128) and half portrait (128 x 96), one json."""
    root = tmp_path_factory.mktemp("mixed")
    parts = []
    for name, size, seed in (("wide", (96, 128), 1), ("tall", (128, 96), 2)):
        generate_shapes_dataset(root / name, num_train=8, num_val=2, image_size=size, seed=seed)
        parts.append(json.loads((root / name / "annotations" / "instances_train.json").read_text()))
    (root / "train").mkdir()
    merged = {**parts[0], "images": [], "annotations": []}
    for offset, (name, part) in zip((0, 1000), zip(("wide", "tall"), parts)):
        for image in part["images"]:
            shutil.copy(root / name / "train" / image["file_name"], root / "train" / f"{name}_{image['file_name']}")
            merged["images"].append({**image, "id": image["id"] + offset, "file_name": f"{name}_{image['file_name']}"})
        merged["annotations"] += [{**a, "id": a["id"] + offset, "image_id": a["image_id"] + offset}
                                  for a in part["annotations"]]
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_train.json").write_text(json.dumps(merged))
    return root


def _restart_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(data, out), "data.val.annotations=", "train.max_iter=8", "train.batch_size=2",
            "train.checkpoint_period=2", "train.log_period=1", "train.deterministic=true",
            "train.dist_timeout_s=120", *extra]


@pytest.mark.parametrize("loading", ["workers0", "workers2_grouped"])
def test_a_rank_killed_mid_run_restarts_and_ends_bit_identical(shapes_dir, mixed_orientation_dir,
                                                               tmp_path, loading):
    """SIGKILL of rank 1 as it starts iteration 6 (checkpoint 4 is complete by then): torchrun
    restarts the group, which resumes from model_0000004.pth by itself and ends with the weights
    and optimizer state of an uninterrupted 2-rank run, bit for bit (deterministic, CPU)."""
    data, extra = shapes_dir, ["data.num_workers=0"]
    if loading == "workers2_grouped":
        data, extra = mixed_orientation_dir, ["data.num_workers=2", "data.aspect_ratio_grouping=true"]
    _ok(_torchrun(*_restart_overrides(data, tmp_path / "ref", *extra)))
    killed = _torchrun(*_restart_overrides(data, tmp_path / "killed", *extra), max_restarts=1, fault="kill@6")
    stdout = _ok(killed)
    assert "fault: rank 1 killed at iteration 6" in killed.stderr  # the fault did strike
    assert f"torchrun restart 1: resuming from {tmp_path / 'killed' / 'model_0000004.pth'}" in stdout
    assert "iterations 4..8" in stdout

    reference = load_checkpoint(tmp_path / "ref" / "model_final.pth")
    restarted = load_checkpoint(tmp_path / "killed" / "model_final.pth")
    assert restarted["iteration"] == reference["iteration"] == 8
    assert restarted["samples_seen"] == reference["samples_seen"] == 8 * 4
    for key, value in reference["model"].items():
        assert torch.equal(restarted["model"][key], value), key
    assert restarted["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    for index, values in reference["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(restarted["optimizer"]["state"][index][name]),
                               torch.as_tensor(value)), (index, name)


def _first_image_of_rank1(data: Path) -> str:
    coco = json.loads((data / "annotations" / "instances_train.json").read_text())
    image_ids = sorted(img["id"] for img in coco["images"])
    first = image_ids[next(iter(InfiniteSampler(len(image_ids), 42, rank=1, world_size=2, batch_size=2)))[0]]
    return next(img["file_name"] for img in coco["images"] if img["id"] == first)


@pytest.mark.parametrize("failure", ["unreadable_image", "diverged"])
def test_a_failure_that_repeats_ends_the_job_without_retrying(tmp_path, failure):
    """A restart would meet the same unreadable image (exit 2) or the same divergence (exit 1):
    the restarted attempts stop before any start-up work, each with the first attempt's error."""
    data = tmp_path / "data"
    generate_shapes_dataset(data, num_train=8, num_val=2, image_size=128, seed=6)
    fault, code = "", 2
    if failure == "unreadable_image":
        name = _first_image_of_rank1(data)
        (data / "train" / name).write_bytes(b"not an image")
        expected = f"cannot read image {data / 'train' / name}"
    else:
        fault, code, expected = "nan@1", 1, "2 consecutive steps with a non-finite loss or gradient"
    proc = _torchrun(*tiny_overrides(data, tmp_path / "run"), "train.max_iter=3", "train.batch_size=2",
                     "train.seed=42", "data.val.annotations=", "train.max_bad_steps=2",
                     "train.dist_timeout_s=60", max_restarts=2, fault=fault, timeout=240)
    assert proc.returncode != 0
    assert proc.stdout.count(f"training {tmp_path / 'run'}:") == 1, proc.stdout  # only attempt 0 started
    not_retried = re.findall(r"error: (.*)\(attempt 0 of this torchrun job failed so; a restart would "
                             r"repeat it: not retrying\)", proc.stderr)
    assert len(not_retried) == 2 and all(expected in line for line in not_retried), proc.stderr[-4000:]
    assert f"exitcode  : {code}" in proc.stderr  # torchrun's summary of the last attempt
    assert not (tmp_path / "run" / "model_final.pth").exists()


def test_a_hung_rank_ends_the_job_within_the_timeout_naming_itself(shapes_dir, tmp_path):
    """Rank 1 blocks in its data loader at iteration 3 (stream position 10 of batches 2 x 2)."""
    timeout_s = 10
    proc = _torchrun(*tiny_overrides(shapes_dir, tmp_path / "run"), "data.val.annotations=",
                     "train.max_iter=6", "train.batch_size=2", f"train.dist_timeout_s={timeout_s}",
                     fault="hang@10", timeout=240)
    ended = time.time()
    assert proc.returncode != 0
    hung_at = float(re.search(r"fault: rank 1 hangs in its data loader at stream position 10 at ([\d.]+)",
                              proc.stderr).group(1))
    waited = re.search(r"error: rank 1 waited ([\d.]+) s for its data loader \(iteration 3\), longer than "
                       rf"train\.dist_timeout_s={timeout_s}", proc.stderr)
    assert waited, proc.stderr[-4000:]
    assert timeout_s <= float(waited.group(1)) < timeout_s + 1
    # the whole job, torchrun's teardown of rank 0 included, is over soon after the timeout
    assert timeout_s <= ended - hung_at < timeout_s + 10
    assert not (tmp_path / "run" / "model_final.pth").exists()


def test_the_watchdog_ends_only_a_wait_that_outlasts_its_timeout():
    code = ("import time; from retinanet.engine.watchdog import Watchdog\n"
            "dog = Watchdog(timeout_s=1.0, rank=3, enabled=True)\n"
            "with dog.waiting('its data loader', 7): time.sleep(0.5)\n"  # shorter: no effect
            "print('first wait over', flush=True)\n"
            "with dog.waiting('its data loader', 8): time.sleep(30)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "first wait over" in proc.stdout
    assert re.search(r"error: rank 3 waited 1\.\d s for its data loader \(iteration 8\)", proc.stderr)
    assert time.monotonic() - start < 20


def test_outside_torchrun_nothing_changes(monkeypatch, tmp_path):
    for name in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(name, raising=False)
    logs = []
    assert elastic.restart_count() == 0
    assert elastic.resume_after_restart(None, logs.append) is None
    assert elastic.resume_after_restart("auto", logs.append) == "auto"
    assert elastic.attempt_store() is None and elastic.repeated_failure() is None
    elastic.checkpoint_written(tmp_path / "model_0000002.pth")  # no store: nothing to note
    elastic.failure_repeats("message", 2)
    assert not logs
