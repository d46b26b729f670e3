"""The README's "Fine-tune on your own images" commands work as written, on a tiny generated Pascal
VOC folder (and the YOLO form of the data arguments on a tiny YOLO folder): the commands are read
from the README, their `data/mine` and `runs/mine` paths pointed at temporary folders.

No network: torchvision's COCO weights, which the config names, are a generated state dict of
torchvision's own model under the published file name in a temporary TORCH_HOME (as
tests/test_weights.py does), and a download is refused. Training runs 1 iteration at a 64 px input
(TINY: overrides of the test, not of the README) to stay within seconds; tools/infer.py then runs
in this process on the checkpoint it wrote, which carries those sizes.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path
from urllib.error import URLError

import cv2
import numpy as np
import pytest
import torch
from torchvision.models.detection import RetinaNet_ResNet50_FPN_Weights, retinanet_resnet50_fpn

from retinanet.config import load_config
from retinanet.data.formats import check_dataset
from retinanet.engine.building import build_datasets
from retinanet.engine.trainer import Trainer

from conftest import REPO_ROOT

SECTION = "## Fine-tune on your own images"
TINY = ["train.max_iter=1", "train.batch_size=2", "data.num_workers=0", "train.device=cpu",
        "data.min_size=[64]", "data.max_size=96", "data.test_min_size=64", "data.test_max_size=96",
        "eval.num_vis_images=1"]


def readme_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, "the README has no fine-tuning section"
    return text.split(SECTION, 1)[1].split("\n## ", 1)[0]


def readme_commands(root: Path, runs: Path) -> dict[str, list[str]]:
    """{tool stem: its arguments} of the section's bash block, paths moved to `root` / `runs`."""
    block = re.search(r"```bash\n(.*?)```", readme_section(), re.DOTALL).group(1)
    commands = {}
    for line in block.replace("\\\n", " ").splitlines():
        python, tool, *args = shlex.split(line)
        assert python == ".venv/bin/python" and tool.startswith("tools/"), line
        commands[Path(tool).stem] = [a.replace("data/mine", str(root)).replace("runs/mine", str(runs))
                                     for a in args]
    assert list(commands) == ["check_dataset", "train", "infer"]
    return commands


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def overrides(args: list[str]) -> list[str]:
    return [a for a in args if "=" in a and not a.startswith("-")]


def _image(path: Path, seed: int) -> None:
    image = np.random.default_rng(seed).integers(0, 60, (64, 96, 3), dtype=np.uint8)
    image[10:40, 8:38] = 220  # the cat
    image[20:60, 50:90] = 120  # the dog
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


def make_voc(root: Path) -> None:
    """root/JPEGImages/a..d.jpg, root/Annotations/*.xml (a cat and a dog each), ImageSets/Main
    train.txt (a, b, c) and val.txt (d)."""
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for seed, stem in enumerate("abcd"):
        _image(root / "JPEGImages" / f"{stem}.jpg", seed)
        objects = "".join(f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x0}</xmin>"
                          f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
                          for name, (x0, y0, x1, y1) in (("cat", (9, 11, 38, 40)), ("dog", (51, 21, 90, 60))))
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>96</width><height>64</height>"
            f"<depth>3</depth></size>{objects}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\n")
    (root / "ImageSets" / "Main" / "val.txt").write_text("d\n")


def make_yolo(root: Path) -> None:
    """root/data.yaml (cat, dog), images/{train,val}, labels/{train,val}."""
    root.mkdir(parents=True)
    (root / "data.yaml").write_text("names: [cat, dog]\n")
    for seed, (split, stem) in enumerate((("train", "a"), ("train", "b"), ("val", "c"))):
        _image(root / "images" / split / f"{stem}.jpg", seed)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split / f"{stem}.txt").write_text(
            "0 0.239583 0.390625 0.3125 0.46875\n1 0.729167 0.625 0.416667 0.625\n")


@pytest.fixture
def coco_weights(tmp_path, monkeypatch) -> Path:
    """A TORCH_HOME whose hub cache holds torchvision's RetinaNet (random weights, COCO's 91
    classes) under the file name of RetinaNet_ResNet50_FPN_Weights.COCO_V1; downloads refused."""
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    state = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    torch.save(state, folder / RetinaNet_ResNet50_FPN_Weights.COCO_V1.url.rsplit("/", 1)[1])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args, **kwargs):
        raise URLError("no network in tests")
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    return folder


def test_readme_commands_check_and_fine_tune_a_voc_folder(tmp_path, coco_weights, monkeypatch):
    root, runs = tmp_path / "mine", tmp_path / "runs" / "mine"
    make_voc(root)
    commands = readme_commands(root, runs)

    check = commands["check_dataset"]
    report = check_dataset(option(check, "--images"), option(check, "--annotations"))
    assert report.ok and report.num_images == 3, report.format()

    train = commands["train"]
    config_path = REPO_ROOT / option(train, "--config")
    assert config_path.name == "finetune_coco_R50.yaml"
    config = load_config(config_path, overrides(train) + TINY)
    assert config.model.weights == "RetinaNet_ResNet50_FPN_Weights.COCO_V1"
    assert config.output_dir == str(runs) and config.train.eval_period == 0
    logs: list[str] = []
    result = Trainer(config, log=logs.append).train()
    # every tensor of the COCO model but the classifier (91 classes -> cat, dog)
    assert ("initialised from RetinaNet_ResNet50_FPN_Weights.COCO_V1; re-initialised (shape "
            "differs): head.cls_score.weight, head.cls_score.bias") in logs
    assert result is not None and 0 <= result["metrics"]["AP"] <= 1  # evaluated at the end
    assert (runs / "model_final.pth").is_file() and (runs / "eval" / "metrics.json").is_file()
    assert list((runs / "vis").glob("*.png"))  # validation images drawn

    # tools/infer.py as written: the checkpoint alone (no --config), on a folder of photos
    infer = [a.replace("photos/", str(root / "JPEGImages")) for a in commands["infer"]]
    assert "--config" not in infer and option(infer, "--weights") == str(runs / "model_final.pth")
    spec = importlib.util.spec_from_file_location("infer_tool", REPO_ROOT / "tools" / "infer.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "argv", ["tools/infer.py", *infer])  # 64 px: the checkpoint's config
    assert tool.main() == 0
    written = json.loads((runs / "infer" / "detections.json").read_text())
    assert [c["name"] for c in written["categories"]] == ["cat", "dog"]  # from the checkpoint
    assert len(list((runs / "infer").glob("*.png"))) == 4  # every photo drawn


def test_readme_yolo_data_arguments_load(tmp_path):
    """The YOLO form of the data arguments (inline in the README) reads a YOLO folder."""
    root = tmp_path / "mine"
    make_yolo(root)
    prose = re.sub(r"```.*?```", "", readme_section(), flags=re.DOTALL)
    spans = [s for s in re.findall(r"`([^`]+)`", prose) if "data.train.images=" in s]
    assert len(spans) == 1 and "data.yaml" in spans[0], spans
    train = [a.replace("data/mine", str(root)) for a in spans[0].split()]
    val = [a.replace("data.train.", "data.val.").replace("/train", "/val") for a in train]  # "the same with val"
    config = load_config(REPO_ROOT / "configs" / "finetune_coco_R50.yaml", train + val)
    train_set, val_set = build_datasets(config, log=lambda line: None)
    assert train_set.class_names == val_set.class_names == ["cat", "dog"]
    assert (len(train_set), len(val_set)) == (2, 1)

