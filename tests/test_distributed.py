"""Real multi-process training with torchrun (gloo on CPU): 2 ranks train like 1 (in float64,
with planted mistakes to show the comparison catches them), on one node or as two single-process
"nodes" of a c10d rendezvous, and evaluate like 1, one rank with
only negative images does not hang DDP, and a failing rank ends the job. Training is pinned to
the CPU (train.device=cpu), also on a machine with a GPU: NCCL needs one GPU per rank."""
from __future__ import annotations

import json
import os
import socket
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


def test_two_process_training_and_distributed_evaluation(shapes_dir, tmp_path, channels_last):
    run = tmp_path / "ddp"
    overrides = tiny_overrides(shapes_dir, run) + [f"model.channels_last={channels_last}",
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


# ------------------------------------------------------------------------------------------------
# 2 ranks x batch 2 train like 1 process x batch 4
# ------------------------------------------------------------------------------------------------
# What the arithmetic promises. DDP averages the ranks' gradients and the criterion divides by the
# mean positive count over ranks, so 2 x 2 computes the same sums as 1 x 4 in another order. In
# float32 that is not enough to compare beyond the first step: ReLU and max-pool gradients are
# discontinuous, and an input within rounding (~1e-7) of a kink flips its mask on one side only
# (seen: backbone momentum 1-11 % apart after 3 steps on one CPU, equal on another). So the runs
# compared here are float64 (tests/ddp_worker.py): reduction order then moves values by about
# n * 2^-53 relative for sums of n <= 1e6 terms, ~1e-10, and a kink would have to lie within that
# of an input. Bound used: 1e-8 of each tensor's largest magnitude, for the first step's
# gradients and for the weights and momentum after 3 steps. A real mistake moves them by O(1) of
# that scale (the planted ones below: > 1e-2); the normaliser and samples seen must be equal.
EQUIVALENCE_STEPS = 3
RELATIVE_BOUND = 1e-8


def _equivalence_overrides(shapes_dir: Path, out: Path, batch: int, channels_last: bool) -> list[str]:
    # FrozenBN backbone: BatchNorm statistics over 2 vs 4 images would differ by design.
    return [*tiny_overrides(shapes_dir, out), f"train.max_iter={EQUIVALENCE_STEPS}",
            "model.backbone.norm=frozen_bn", "train.optimizer.type=sgd", "train.optimizer.lr=0.01",
            "train.scheduler.warmup_iters=0", "data.val.annotations=", "train.checkpoint_period=0",
            f"train.batch_size={batch}", "train.device=cpu", f"model.channels_last={channels_last}"]


def _equivalence_run(shapes_dir: Path, out: Path, *, ranks: int, channels_last: bool,
                     plant: str = "") -> dict:
    worker = str(REPO_ROOT / "tests" / "ddp_worker.py")
    overrides = _equivalence_overrides(shapes_dir, out, 4 // ranks, channels_last)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PLANT=plant)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    _ok(subprocess.run([*launcher, worker, CONFIG, *overrides], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=300, env=env))
    return _equivalence_result(out)


def _equivalence_result(out: Path) -> dict:
    """What tests/ddp_worker.py and the trainer wrote to `out`."""
    final = load_checkpoint(out / "model_final.pth")
    return {"grads": torch.load(out / "first_grads.pth", weights_only=True), "model": final["model"],
            "momentum": {i: s["momentum_buffer"] for i, s in final["optimizer"]["state"].items()},
            "samples_seen": final["samples_seen"], **json.loads((out / "records.json").read_text())}


def _far_apart(a: dict, b: dict) -> list[str]:
    """Names of the tensors of `a` that differ from `b`'s by more than RELATIVE_BOUND of their scale."""
    return [str(name) for name, x in a.items()
            if (x - b[name]).abs().max() > RELATIVE_BOUND * max(x.abs().max(), b[name].abs().max())]


def _assert_equivalent(two: dict, one: dict) -> None:
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["samples_seen"] == one["samples_seen"] == 4 * EQUIVALENCE_STEPS
    # each rank divides by the mean positive count over ranks: half the whole batch's count
    assert len(two["normalisers"]) == len(one["normalisers"]) == EQUIVALENCE_STEPS
    assert [2 * n for n in two["normalisers"]] == one["normalisers"]
    assert max(g.abs().max() for g in one["grads"].values()) > 1e-3  # a step that moves weights
    assert two["grads"].keys() == one["grads"].keys()
    assert not _far_apart(two["grads"], one["grads"]), "first-step gradients differ"
    assert not _far_apart(two["model"], one["model"]), f"weights after {EQUIVALENCE_STEPS} steps differ"
    assert not _far_apart(two["momentum"], one["momentum"]), "momentum buffers differ"


@pytest.fixture(scope="module")
def one_process(shapes_dir, tmp_path_factory):
    """The 1 x 4 reference run per layout, run once for the tests that compare against it."""
    runs = {}

    def get(channels_last: bool) -> dict:
        if channels_last not in runs:
            runs[channels_last] = _equivalence_run(shapes_dir, tmp_path_factory.mktemp("one"), ranks=1,
                                                   channels_last=channels_last)
        return runs[channels_last]
    return get


def test_two_ranks_of_batch_2_train_like_one_process_of_batch_4(shapes_dir, tmp_path, one_process,
                                                                channels_last):
    two = _equivalence_run(shapes_dir, tmp_path / "two", ranks=2, channels_last=channels_last)
    _assert_equivalent(two, one_process(channels_last))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_of_one_process_train_like_one_process_of_batch_4(shapes_dir, tmp_path, one_process):
    """Two torchrun agents as two "nodes" (--nnodes=2, c10d rendezvous on 127.0.0.1), one rank of
    batch 2 each: the same promise and bounds as 2 ranks on one node against 1 x 4."""
    out = tmp_path / "two_nodes"
    overrides = _equivalence_overrides(shapes_dir, out, 2, channels_last=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PLANT="")
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=two_nodes",
            str(REPO_ROOT / "tests" / "ddp_worker.py"), CONFIG, *overrides]
    nodes = [subprocess.Popen(node, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    try:
        outputs = [proc.communicate(timeout=300) for proc in nodes]
    finally:
        for proc in nodes:
            proc.kill()  # a node left waiting for a failed peer would otherwise wait minutes
    for proc, (stdout, stderr) in zip(nodes, outputs):
        assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert sum(f"training {out}:" in stdout for stdout, _ in outputs) == 1  # rank 0 is on one node
    _assert_equivalent(_equivalence_result(out), one_process(False))


@pytest.mark.parametrize("plant", ["num_fg_not_averaged", "rank1_gradient_dropped"])
def test_the_equivalence_check_catches_a_planted_mistake(shapes_dir, tmp_path, one_process, plant):
    one = one_process(False)
    two = _equivalence_run(shapes_dir, tmp_path / "two", ranks=2, channels_last=False, plant=plant)
    with pytest.raises(AssertionError):
        _assert_equivalent(two, one)
    # and by a wide margin: the first step's gradients are far outside the bound
    worst = max(float((two["grads"][k] - g).abs().max() / g.abs().max().clamp(min=1e-30))
                for k, g in one["grads"].items())
    assert worst > 1e-2


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
