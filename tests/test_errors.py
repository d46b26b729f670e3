"""The user's errors are ours (retinanet.errors): one line and exit 2 (a diverged run exit 1);
anything else keeps its traceback. `key=value` overrides go anywhere on a tool's command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from retinanet.cli import config_parser, run_cli
from retinanet.errors import (CheckpointError, ConfigError, DataError, MissingFileError,
                              TrainingDiverged, UserError)

from conftest import REPO_ROOT

CONFIG = REPO_ROOT / "configs" / "shapes_R18.yaml"


def test_tool_prints_one_line_and_exits_2_with_overrides_on_both_sides_of_an_option(tmp_path):
    # overrides before and after --weights reach the config (argparse alone would call the
    # second "unrecognized arguments"); the run then fails on the missing weights file only
    weights = tmp_path / "nonexistent.pth"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "eval.py"), "--config", str(CONFIG),
                             "model.num_classes=3", "--weights", str(weights), "eval.max_dets=50"],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(weights) in lines[0] and "not found" in lines[0]
    assert "Traceback" not in result.stderr and "unrecognized arguments" not in result.stderr


@pytest.mark.parametrize("argv", [
    ["--config", "c", "a=1", "--weights", "w", "b=2"],
    ["a=1", "b=2", "--config", "c", "--weights", "w"],
    ["--weights", "w", "--config", "c", "a=1", "b=2"],
    ["a=1", "--config", "c", "b=2", "--weights", "w"],
])
def test_overrides_are_accepted_anywhere(argv):
    parser = config_parser("x")
    parser.add_argument("--weights", required=True)
    args = parser.parse_args(argv)
    assert args.config == "c" and args.weights == "w" and args.overrides == ["a=1", "b=2"]


@pytest.mark.parametrize("error", [ConfigError("model.x: bad"), DataError("ann.json: image 3 bad"),
                                   MissingFileError("weights not found: w.pth"),
                                   CheckpointError("w.pth: does not fit")])
def test_user_errors_are_one_line_and_exit_2(error, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


def test_diverged_training_exits_1(capsys):
    def main():
        raise TrainingDiverged("5 consecutive non-finite steps at iteration 12: lower train.optimizer.lr")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: 5 consecutive non-finite steps at iteration 12: "
                                       "lower train.optimizer.lr\n")


@pytest.mark.parametrize("error", [ValueError("bug"), FileNotFoundError("bug"), RuntimeError("bug"),
                                   TypeError("bug"), FloatingPointError("bug")])
def test_other_errors_keep_their_traceback(error, capsys):
    def main():
        raise error

    with pytest.raises(type(error), match="bug"):  # not turned into SystemExit
        run_cli(main)
    assert capsys.readouterr().err == ""


def test_success_exits_0():
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: None)
    assert exit_info.value.code == 0


# ------------------------------------------------------------------------------------------------
# What the package raises for things a user can fix
# ------------------------------------------------------------------------------------------------
def _raises_data_coco(tmp_path):
    from retinanet.data import load_coco
    path = tmp_path / "broken.json"
    path.write_text("[1, 2]")
    load_coco(path)


def _raises_missing_annotations(tmp_path):
    from retinanet.data import CocoDetection
    CocoDetection(tmp_path, tmp_path / "nope.json")


def _raises_missing_image_folder(tmp_path):
    from retinanet.data import CocoDetection
    CocoDetection(tmp_path / "no_images", tmp_path / "ann.json")


def _raises_unknown_category(tmp_path):
    from retinanet.data import CocoDetection
    (tmp_path / "img").mkdir()
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
                                "annotations": [{"id": 5, "image_id": 1, "category_id": 9,
                                                 "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0}],
                                "categories": [{"id": 1, "name": "a"}]}))
    CocoDetection(tmp_path / "img", path)


def _raises_unset_split(tmp_path):
    from retinanet.config import load_config
    from retinanet.data import build_dataset
    build_dataset(load_config(CONFIG, ["data.val.annotations="]).data, train=False)


def _raises_unreadable_input(tmp_path):
    from retinanet.inference import read_rgb
    (tmp_path / "x.png").write_bytes(b"not an image")
    read_rgb(tmp_path / "x.png")


def _raises_no_inputs(tmp_path):
    from retinanet.inference import expand_inputs
    expand_inputs(tmp_path / "*.jpg")


def _raises_opset(tmp_path):
    from retinanet.export import check_onnx_opset
    check_onnx_opset(11)


def _raises_backbone_weights(tmp_path):
    from retinanet.model.backbone import ResNetBackbone
    from retinanet.weights import load_imagenet_weights
    load_imagenet_weights(ResNetBackbone(depth=18), tmp_path / "resnet18.pth", depth=18)


def _raises_backbone_keys(tmp_path):
    from retinanet.model.backbone import ResNetBackbone
    from retinanet.weights import load_imagenet_weights
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet18.pth")
    load_imagenet_weights(ResNetBackbone(depth=18), tmp_path / "resnet18.pth", depth=18)


def _raises_not_torchvision(tmp_path):
    from retinanet.weights import convert_torchvision_state
    convert_torchvision_state({"x": torch.zeros(1)}, "v1")


def _raises_resume_batch(tmp_path):
    from retinanet.data import build_train_loader
    build_train_loader(list(range(8)), batch_size=4, num_workers=0, seed=0, size_divisibility=128,
                       start_position=6)


@pytest.mark.parametrize("call, error, text", [
    (_raises_data_coco, DataError, "broken.json: not a COCO instances json"),
    (_raises_missing_annotations, MissingFileError, "annotation file not found: .*nope.json"),
    (_raises_missing_image_folder, MissingFileError, "image folder not found: .*no_images"),
    (_raises_unknown_category, DataError, "annotation 5 of image 1 has unknown category_id 9"),
    (_raises_unset_split, ConfigError, "data.val.images and data.val.annotations must be set"),
    (_raises_unreadable_input, DataError, r"cannot read image .*x\.png"),
    (_raises_no_inputs, MissingFileError, r"no image files match the pattern .*\*\.jpg"),
    (_raises_opset, ConfigError, "ONNX opset 11 is not supported: use 16"),
    (_raises_backbone_weights, MissingFileError, "backbone weights not found: .*model.backbone.weights"),
    (_raises_backbone_keys, CheckpointError, r"resnet18\.pth: not a torchvision ResNet-18 state dict"),
    (_raises_not_torchvision, CheckpointError, r"not part of a torchvision RetinaNet v1: \[.x.\]"),
    (_raises_resume_batch, ConfigError, r"stream position 6 .* \(train\.batch_size\)"),
], ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_user_fixable_errors_are_ours_and_one_line(tmp_path, call, error, text):
    with pytest.raises(error, match=text) as info:
        call(tmp_path)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
