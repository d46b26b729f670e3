"""Training survives bad data and bad numbers, and resumes exactly: hostile datasets,
non-finite inputs and losses, kept checkpoints, SIGKILL at any point."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retinanet.config import load_config
from retinanet.data import CocoDetection, build_dataset, build_train_loader
from retinanet.engine.checkpoint import load_checkpoint
from retinanet.engine.trainer import Trainer
from retinanet.losses.matcher import IGNORE, Matcher

from conftest import REPO_ROOT, tiny_overrides
from hostile import make_hostile_coco

CONFIG = REPO_ROOT / "configs" / "shapes_R18.yaml"


# ------------------------------------------------------------------------------------------------
# Hostile datasets
# ------------------------------------------------------------------------------------------------
def _trainable_hostile(root: Path) -> dict:
    """The hostile dataset minus what no training policy can repair (duplicate ids, unknown
    categories, orphans): left are degenerate / non-numeric / outside boxes, a missing, a
    truncated and a non-image file, a size mismatch and an image without annotations."""
    info = make_hostile_coco(root)
    data = json.loads(info["annotations"].read_text())
    seen = set()
    data["images"] = [i for i in data["images"] if not (i["id"] in seen or seen.add(i["id"]))]
    seen = set()
    data["annotations"] = [a for a in data["annotations"]
                           if a["category_id"] in (1, 2) and a["image_id"] != 404
                           and not (a["id"] in seen or seen.add(a["id"]))]
    info["annotations"].write_text(json.dumps(data))
    return info


def _hostile_config(info: dict, tmp_path: Path, *extra: str):
    return load_config(CONFIG, [f"data.train.images={info['images']}",
                                f"data.train.annotations={info['annotations']}",
                                "data.val.annotations=", f"output_dir={tmp_path / 'run'}",
                                "data.num_workers=0", "train.batch_size=4", "train.max_iter=3", "train.time_budget_s=0",
                                "train.log_period=1", "model.fpn.channels=32", "model.head.num_convs=1",
                                "model.head.gn_groups=8", *extra])


def test_training_on_hostile_data_drops_counts_and_skips(tmp_path, caplog):
    info = _trainable_hostile(tmp_path / "hostile")
    logs = []
    trainer = Trainer(_hostile_config(info, tmp_path, "data.skip_bad_images=true"), log=logs.append)
    text = "\n".join(logs)
    # the checks ran at start and said what they found
    assert "zero_size_box: 6 annotation(s)" in text and "non_finite_box: 5 annotation(s)" in text
    assert "image_missing: 1 image(s)" in text and "box_outside_image" in text
    # degenerate boxes dropped with one counted warning, the missing file left out
    assert "dropped 11 annotation(s)" in caplog.text
    assert 2 not in trainer.train_set.image_ids and "leaving out 1 image(s)" in caplog.text
    for image_id in trainer.train_set.image_ids:  # boxes that remain are clipped and non-empty
        boxes, _ = trainer.train_set.targets(image_id)
        assert ((boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= 40).all()
                and (boxes[:, 3] <= 30).all())
    trainer.train()  # unreadable files (truncated.png, not_an_image.png) are met and replaced
    assert {3, 4} <= set(trainer.train_set.skipped_images)
    assert "not_an_image.png" in caplog.text or "truncated.png" in caplog.text
    assert torch.isfinite(load_checkpoint(tmp_path / "run" / "model_final.pth")["model"]
                          ["fpn.p6.weight"]).all()


def test_hostile_data_errors_name_the_problem(tmp_path):
    info = _trainable_hostile(tmp_path / "hostile")
    strict = CocoDetection(info["images"], info["annotations"])  # skip_bad_images off
    with pytest.raises(FileNotFoundError, match=r"cannot read image .*truncated\.png \(image id 3"):
        strict[strict.image_ids.index(3)]
    with pytest.raises(ValueError, match=r"image_missing: 1 image\(s\) whose file does not exist \(first ids: 2\)"):
        Trainer(_hostile_config(info, tmp_path), log=lambda s: None)  # skip_bad_images off
    raw = make_hostile_coco(tmp_path / "raw")  # duplicate ids, unknown category, orphan
    with pytest.raises(ValueError) as error:
        Trainer(_hostile_config(raw, tmp_path, "data.skip_bad_images=true"), log=lambda s: None)
    message = str(error.value)
    assert "tools/check_dataset.py" in message
    for check in ("duplicate_image_id", "duplicate_annotation_id", "orphan_annotation", "unknown_category"):
        assert check in message
    assert "zero_size_box" not in message  # that one is handled, not fatal


# ------------------------------------------------------------------------------------------------
# Non-finite inputs, losses and checkpoints
# ------------------------------------------------------------------------------------------------
def _trainer_and_batch(config, device: str):
    """A trainer on `device` and one batch there; on CPU the finiteness check of a step is
    immediate (a skipped step returns None), on CUDA it is deferred (see Trainer.step)."""
    config.data.val.annotations = ""
    config.train.max_bad_steps = 3
    config.train.device = device
    logs = []
    trainer = Trainer(config, log=logs.append)
    loader = build_train_loader(trainer.train_set, batch_size=2, num_workers=0, seed=0,
                                size_divisibility=config.data.size_divisibility)
    return trainer, next(iter(loader)).to(trainer.device), logs


@pytest.fixture
def trainer_and_batch(tiny_config):
    return _trainer_and_batch(tiny_config, "cpu")


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_images_never_reach_the_weights(trainer_and_batch, value, tmp_path):
    trainer, batch, logs = trainer_and_batch
    assert trainer._bn_buffers  # the demo backbone has trainable BatchNorm: its statistics too
    before = _state(trainer)
    batch.images[0, :, 5:9, 5:9] = value
    for attempt in range(2):
        assert trainer.step(batch) is None
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any("step skipped, weights unchanged" in line and str(batch.image_ids) in line for line in logs)
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .* image ids"):
        trainer.step(batch)  # max_bad_steps = 3
    path = trainer.save("model_after_nan.pth")
    assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values()
               if v.is_floating_point())


def test_a_good_step_resets_the_count_and_nan_weights_are_never_written(trainer_and_batch):
    trainer, batch, _ = trainer_and_batch
    bad = type(batch)(batch.images.clone().fill_(float("nan")), batch.boxes, batch.labels,
                      batch.image_ids, batch.image_sizes, batch.orig_sizes)
    assert trainer.step(bad) is None and trainer.step(bad) is None
    losses = trainer.step(batch)
    assert losses is not None and trainer.bad_steps == 0
    assert all(torch.isfinite(v) for v in losses.values())
    with torch.no_grad():
        trainer.model.fpn.p6.weight[0, 0, 0, 0] = float("nan")  # only a bug could do this
    # with EMA on, the edited weights are the raw ones, kept under model_raw beside the average
    key = ("model_raw." if trainer.config.train.ema.enabled else "") + "fpn.p6.weight"
    with pytest.raises(FloatingPointError,
                       match=rf"not writing .*model_nan\.pth: non-finite values in \['{re.escape(key)}'\]"):
        trainer.save("model_nan.pth")
    assert not (Path(trainer.config.output_dir) / "model_nan.pth").exists()


def test_all_ignored_batch_trains_without_nan(tiny_config):
    # fg_iou 1 and a tiny bg_iou with one box over each whole image: every anchor is ignored
    tiny_config.train.device = "cpu"
    tiny_config.model.matcher.fg_iou, tiny_config.model.matcher.bg_iou = 1.0, 1e-6
    tiny_config.model.matcher.allow_low_quality = False
    tiny_config.data.val.annotations = ""
    trainer = Trainer(tiny_config, log=lambda s: None)
    loader = build_train_loader(trainer.train_set, batch_size=2, num_workers=0, seed=0,
                                size_divisibility=tiny_config.data.size_divisibility)
    batch = next(iter(loader))
    batch.boxes = [torch.tensor([[0.5, 0.5, w - 0.5, h - 0.5]]) for h, w in batch.image_sizes]
    batch.labels = [torch.tensor([0]) for _ in batch.boxes]
    anchors = trainer.model(batch.images).anchors
    matched = Matcher(fg_iou=1.0, bg_iou=1e-6, allow_low_quality=False)(
        anchors, torch.stack(batch.boxes), torch.ones(2, 1, dtype=torch.bool))
    assert (matched == IGNORE).all()  # the premise
    losses = trainer.step(batch)
    assert losses is not None and losses["num_fg"] == 0
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ------------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ------------------------------------------------------------------------------------------------
def test_only_the_last_k_checkpoints_are_kept(tiny_config):
    tiny_config.data.val.annotations = ""
    tiny_config.train.max_iter, tiny_config.train.checkpoint_period = 6, 1
    tiny_config.train.keep_checkpoints = 2
    Trainer(tiny_config, log=lambda s: None).train()
    names = sorted(p.name for p in Path(tiny_config.output_dir).glob("model_*.pth"))
    assert names == ["model_0000004.pth", "model_0000005.pth", "model_final.pth"]
    state = load_checkpoint(Path(tiny_config.output_dir) / "model_0000005.pth")
    assert state["iteration"] == 5 and state["samples_seen"] == 5 * tiny_config.train.batch_size
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert {"model", "optimizer", "scheduler", "scaler", "criterion"} <= set(state)


def test_batches_do_not_depend_on_workers_or_where_the_stream_starts(shapes_dir, tmp_path):
    config = load_config(CONFIG, tiny_overrides(shapes_dir, tmp_path) + ["data.color_jitter.prob=0.5"])
    dataset = build_dataset(config.data, train=True)

    def batches(workers: int, start: int, count: int):
        loader = build_train_loader(dataset, batch_size=3, num_workers=workers, seed=5,
                                    size_divisibility=128, start_position=start)
        it = iter(loader)
        return [next(it) for _ in range(count)]

    uninterrupted = batches(0, 0, 4)
    resumed = batches(2, 6, 2)  # two workers, starting at batch 2
    for a, b in zip(uninterrupted[2:], resumed):
        assert a.image_ids == b.image_ids
        assert torch.equal(a.images, b.images)  # same augmentation: flips, scales, colour
        assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes))


def _train_cmd(shapes_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "tools/train.py"), "--config", str(CONFIG),
            *tiny_overrides(shapes_dir, out), "data.val.annotations=", "train.max_iter=8",
            "train.checkpoint_period=2", "train.log_period=1", "train.batch_size=4",
            "train.deterministic=true", *extra]


def _run(cmd, env=None, kill_after_line: str | None = None) -> subprocess.CompletedProcess | int:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if kill_after_line is None:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if kill_after_line in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return proc.returncode


def test_sigkill_anywhere_then_resume_is_bit_identical(shapes_dir, tmp_path, channels_last):
    """Resumed and uninterrupted runs perform the same operations on the same machine: exact,
    in both memory layouts."""
    layout = f"model.channels_last={channels_last}"
    reference = _run(_train_cmd(shapes_dir, tmp_path / "ref", layout))
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "killed"
    # 1. killed between checkpoints (the last one is at iteration 2)
    assert _run(_train_cmd(shapes_dir, out, layout), kill_after_line="iter      3/8") == -signal.SIGKILL
    assert (out / "model_0000002.pth").is_file() and not (out / "model_0000004.pth").exists()
    # 2. resumed, then killed while writing checkpoint 6: its temp file is written, not renamed
    cmd = _train_cmd(shapes_dir, out, layout, "--resume", "auto")
    killed = _run([cmd[0], str(REPO_ROOT / "tests" / "kill_in_save.py"), "model_0000006.pth", *cmd[1:]],
                  kill_after_line="never printed")
    assert killed == -signal.SIGKILL
    assert not (out / "model_0000006.pth").exists() and list(out.glob(".model_0000006.pth.*.tmp"))
    # 3. resumed from checkpoint 4, to the end
    finished = _run(_train_cmd(shapes_dir, out, layout, "--resume", "auto"))
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resumed from" in finished.stdout and "model_0000004.pth" in finished.stdout
    assert "left by an interrupted checkpoint write" in finished.stdout
    assert not list(out.glob("*.tmp"))

    ref_state = load_checkpoint(tmp_path / "ref" / "model_final.pth")
    state = load_checkpoint(out / "model_final.pth")
    assert state["iteration"] == ref_state["iteration"] == 8
    assert state["model"].keys() == ref_state["model"].keys()
    for key in ref_state["model"]:
        assert torch.equal(state["model"][key], ref_state["model"][key]), key
    assert state["optimizer"]["state"].keys() == ref_state["optimizer"]["state"].keys()
    for index, values in ref_state["optimizer"]["state"].items():
        for name, value in values.items():
            assert torch.equal(torch.as_tensor(state["optimizer"]["state"][index][name]),
                               torch.as_tensor(value)), (index, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="deterministic CUDA training needs CUDA")
def test_deterministic_mode_on_cuda_repeats_bit_for_bit(shapes_dir, tmp_path):
    finals = []
    for run in ("a", "b"):
        config = load_config(CONFIG, tiny_overrides(shapes_dir, tmp_path / run) + [
            "data.val.annotations=", "train.max_iter=4", "train.device=cuda", "train.deterministic=true"])
        Trainer(config, log=lambda s: None).train()
        finals.append(load_checkpoint(tmp_path / run / "model_final.pth")["model"])
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_deferred_checks_skip_on_the_device_and_settle_at_the_window(tiny_config, device):
    """The CUDA mode (no host sync per step), on CUDA and forced on CPU: the fused optimizer
    skips on the device-side flag; the skipped steps are logged, and max_bad_steps enforced,
    when settled."""
    trainer, batch, logs = _trainer_and_batch(tiny_config, device)
    assert trainer.optimizer.defaults.get("fused")  # torch >= 2.4 has fused SGD on CPU
    assert trainer.defer_finite_checks == (device == "cuda")  # CUDA's default
    trainer.defer_finite_checks = True
    bad = type(batch)(batch.images.clone().fill_(float("nan")), batch.boxes, batch.labels,
                      batch.image_ids, batch.image_sizes, batch.orig_sizes)
    trainer.step(batch)  # a real step first, so that the optimizer has state to protect
    before = _state(trainer)
    opt_state = [{k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in trainer._params]
    for _ in range(2):
        losses = trainer.step(bad)
        assert float(losses["steps"]) == 0 and float(losses["loss"]) == 0  # NaN zeroed, not summed
    after = _state(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert all(torch.equal(v, trainer.optimizer.state[p][k])
               for saved, p in zip(opt_state, trainer._params) for k, v in saved.items())
    assert not any("step skipped" in line for line in logs)  # nothing read from the device yet
    trainer.settle_skipped_steps()
    assert sum("step skipped, weights unchanged" in line for line in logs) == 2
    losses = trainer.step(batch)  # a good step resets the count and moves the weights
    assert float(losses["steps"]) == 1 and torch.isfinite(losses["loss"]) and float(losses["loss"]) > 0
    trainer.settle_skipped_steps()
    assert trainer.bad_steps == 0
    assert any(not torch.equal(before[k], v) for k, v in _state(trainer).items())
    for _ in range(3):
        trainer.step(bad)
    with pytest.raises(FloatingPointError, match=r"3 consecutive steps .* image ids"):
        trainer.settle_skipped_steps()


def test_fused_sgd_skipped_first_step_leaves_no_garbage_momentum(tiny_config):
    from retinanet.engine.building import build_optimizer
    tiny_config.train.optimizer.type = "sgd"
    tiny_config.train.optimizer.weight_decay = 0.0
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    reference.load_state_dict(model.state_dict())
    fused, plain = build_optimizer(tiny_config, model), torch.optim.SGD(
        reference.parameters(), lr=tiny_config.train.optimizer.lr, momentum=tiny_config.train.optimizer.momentum)
    assert fused.defaults.get("fused")
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    fused.found_inf = torch.tensor(1.0)  # skipped on the device, as the trainer does on CUDA
    fused.step()
    del fused.found_inf
    assert all(torch.equal(fused.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in model.parameters())
    for _ in range(2):  # then real steps: exactly plain SGD's (weight decay 0 on both sides)
        for p, q in zip(model.parameters(), reference.parameters()):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        fused.step()
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
