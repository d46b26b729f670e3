"""Real multi-process training with torchrun (gloo on CPU): 2 ranks train and evaluate like 1,
one rank with only negative images does not hang DDP, and a failing rank ends the job. Training
is pinned to the CPU (train.device=cpu), also on a machine with a GPU: NCCL needs one GPU per
rank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retinanet.data.loader import InfiniteSampler
from retinanet.data.shapes import generate_shapes_dataset
from retinanet.engine.checkpoint import load_checkpoint

from conftest import REPO_ROOT, tiny_overrides

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
CONFIG = str(REPO_ROOT / "configs" / "shapes_R18.yaml")


def _torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", str(REPO_ROOT / "tools/train.py"),
                           "--config", CONFIG, "train.device=cpu", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_two_process_training_and_distributed_evaluation(shapes_dir, tmp_path):
    run = tmp_path / "ddp"
    overrides = tiny_overrides(shapes_dir, run) + [
        "train.max_iter=4", "train.batch_size=2", "train.checkpoint_period=2", "eval.num_vis_images=1",
        "model.postprocess.score_thresh=0.001", "train.dist_timeout_s=120"]
    stdout = _ok(_torchrun(*overrides))
    # rank 0 alone talks and writes
    assert stdout.count(f"training {run}:") == 1 and "batch 2 x 2 processes" in stdout
    assert stdout.count("COCO bbox evaluation") == 1
    assert sorted(p.name for p in run.glob("*.pth")) == ["model_0000002.pth", "model_final.pth"]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    distributed = json.loads((run / "eval" / "metrics.json").read_text())
    assert distributed["num_detections"] > 0

    # the same weights scored by one process: the same numbers
    single = tmp_path / "single_eval"
    _ok(_python("tools/eval.py", "--config", str(run / "config.yaml"), "--weights",
                str(run / "model_final.pth"), "--output", str(single)))
    metrics = json.loads((single / "metrics.json").read_text())
    assert metrics["num_detections"] == distributed["num_detections"]
    for name, value in metrics["metrics"].items():
        assert distributed["metrics"][name] == pytest.approx(value, abs=1e-9), name


def test_two_ranks_of_batch_2_train_like_one_process_of_batch_4(shapes_dir, tmp_path):
    # FrozenBN backbone: BatchNorm statistics over 2 vs 4 images would differ by design.
    common = ["train.max_iter=3", "model.backbone.norm=frozen_bn", "train.optimizer.type=sgd",
              "train.optimizer.lr=0.01", "train.scheduler.warmup_iters=0", "data.val.annotations=",
              "train.checkpoint_period=0"]
    _ok(_torchrun(*tiny_overrides(shapes_dir, tmp_path / "two"), *common, "train.batch_size=2"))
    _ok(_python("tools/train.py", "--config", CONFIG, *tiny_overrides(shapes_dir, tmp_path / "one"),
                *common, "train.batch_size=4", "train.device=cpu"))
    two = load_checkpoint(tmp_path / "two" / "model_final.pth")
    one = load_checkpoint(tmp_path / "one" / "model_final.pth")
    assert two["samples_seen"] == one["samples_seen"] == 12
    for key, value in one["model"].items():
        torch.testing.assert_close(two["model"][key], value, atol=1e-5, rtol=0, msg=key)
    # the gradients themselves agree (SGD's momentum buffers hold their running sum), and are
    # not zero: the weights really moved
    momenta = [(two["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
               for i, s in one["optimizer"]["state"].items()]
    assert momenta and max(float(m.abs().max()) for _, m in momenta) > 1e-3
    for a, b in momenta:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_rank_with_only_negative_images_does_not_hang(tmp_path):
    data = tmp_path / "data"
    generate_shapes_dataset(data, num_train=16, num_val=2, image_size=128, seed=5)
    ann_file = data / "annotations" / "instances_train.json"
    coco = json.loads(ann_file.read_text())
    image_ids = sorted(img["id"] for img in coco["images"])
    # the images rank 1 of 2 gets in 3 iterations of batch 2 (seed 42): strip their boxes
    sampler = iter(InfiniteSampler(len(image_ids), 42, rank=1, world_size=2, batch_size=2))
    rank1 = {image_ids[next(sampler)[0]] for _ in range(6)}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in rank1]
    ann_file.write_text(json.dumps(coco))
    assert {a["image_id"] for a in coco["annotations"]}, "rank 0 must still see boxes"
    proc = _torchrun(*tiny_overrides(data, tmp_path / "run"), "train.max_iter=3", "train.batch_size=2",
                     "train.seed=42", "data.val.annotations=", "train.dist_timeout_s=60", timeout=240)
    _ok(proc)
    state = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    data = tmp_path / "data"
    generate_shapes_dataset(data, num_train=8, num_val=2, image_size=128, seed=6)
    coco = json.loads((data / "annotations" / "instances_train.json").read_text())
    image_ids = sorted(img["id"] for img in coco["images"])
    # corrupt the first image rank 1 reads: it exists (the start-up check passes) but cannot be decoded
    first = image_ids[next(iter(InfiniteSampler(len(image_ids), 42, rank=1, world_size=2, batch_size=2)))[0]]
    name = next(img["file_name"] for img in coco["images"] if img["id"] == first)
    (data / "train" / name).write_bytes(b"not an image")
    proc = _torchrun(*tiny_overrides(data, tmp_path / "run"), "train.max_iter=3", "train.batch_size=2",
                     "train.seed=42", "data.val.annotations=", "train.dist_timeout_s=30", timeout=240)
    assert proc.returncode != 0
    assert f"cannot read image {data / 'train' / name}" in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "model_final.pth").exists()


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    """Two CUDA ranks on a one-GPU node: an error that says what to change, raised before
    set_device would fail with an invalid device ordinal (checked here without a GPU)."""
    from retinanet.engine.distributed import init_distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"local rank 1 .* 1 visible CUDA device.*nproc_per_node.*train\.device=cpu"):
        init_distributed(torch.device("cuda"))
