"""A trained checkpoint is self-contained: its config, class names and category ids travel with it.

One tiny run (2 iterations) on the shapes images with sparse category ids and names of their own,
after which the annotation files are moved away: the tools then run in a folder that holds only
model_final.pth, with no config and no annotation file to fall back on. Sparse ids catch the
old fallback (category id = label + 1) and the names catch "0".."K-1".
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from retinanet import Detector
from retinanet.config import load_config
from retinanet.engine.trainer import Trainer
from retinanet.export import prepare_for_export
from retinanet.inference import read_rgb
from retinanet.predictor import Predictor
from retinanet.weights import load_checkpoint

from conftest import REPO_ROOT, tiny_overrides

# shapes' category id -> (id, name) in the run's dataset: sparse ids, names the shapes json lacks
SPARSE = {1: (3, "ring"), 2: (7, "block"), 3: (11, "wedge"), 4: (20, "spark"), 5: (42, "plus")}
NAMES = [name for _, name in SPARSE.values()]  # label order: sorted ids, which keep this order
IDS = [cat_id for cat_id, _ in SPARSE.values()]
MAX_DETS = 10


def sparse_copy(source: Path, target: Path) -> None:
    """The shapes json `source` with SPARSE's ids and names, written to `target`."""
    data = json.loads(source.read_text())
    data["categories"] = [{**c, "id": SPARSE[c["id"]][0], "name": SPARSE[c["id"]][1]}
                          for c in data["categories"]]
    for ann in data["annotations"]:
        ann["category_id"] = SPARSE[ann["category_id"]][0]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    """The run (its folder), then the annotations moved away and model_final.pth copied alone
    into an empty folder."""
    work = tmp_path_factory.mktemp("from_checkpoint")
    annotations = work / "data" / "annotations"
    for split in ("train", "val"):
        sparse_copy(shapes_dir / "annotations" / f"instances_{split}.json",
                    annotations / f"instances_{split}.json")
    overrides = tiny_overrides(shapes_dir, work / "run") + [
        f"data.train.annotations={annotations / 'instances_train.json'}",
        f"data.val.annotations={annotations / 'instances_val.json'}",
        "train.max_iter=2", "train.batch_size=4", "eval.num_vis_images=0", "eval.pr_curves=false",
        # trained for 2 iterations the scores sit near the prior (0.01): keep them all
        "model.postprocess.score_thresh=0.0", f"model.postprocess.max_detections={MAX_DETS}"]
    torch.manual_seed(0)
    Trainer(load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides), log=lambda s: None).train()
    moved = work / "data" / "moved"
    annotations.rename(moved)  # the run's config now names files that do not exist
    alone = work / "alone"
    alone.mkdir()
    shutil.copy(work / "run" / "model_final.pth", alone / "model_final.pth")
    return {"run": work / "run", "alone": alone, "val_json": moved / "instances_val.json",
            "val_images": shapes_dir / "val", "image": sorted((shapes_dir / "val").glob("*.png"))[0]}


def run_tool(trained, tool: str, *args: str) -> subprocess.CompletedProcess:
    """tools/<tool> run in the folder that holds only the checkpoint (and what earlier tools wrote)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / tool), *args], cwd=trained["alone"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_checkpoint_carries_its_config_class_names_and_category_ids(trained):
    state = load_checkpoint(trained["alone"] / "model_final.pth")
    assert state["class_names"] == NAMES and state["category_ids"] == IDS
    assert isinstance(state["config"], str) and "num_classes: 5" in state["config"]
    data = load_config(trained["run"] / "config.yaml").data
    assert not Path(data.val.annotations).exists() and not Path(data.train.annotations).exists()


def test_infer_from_the_checkpoint_alone(trained):
    alone = trained["alone"]
    assert not [p for p in alone.rglob("*") if p.suffix in (".yaml", ".yml", ".json")]
    result = run_tool(trained, "infer.py", "--weights", "model_final.pth", "--input", str(trained["image"]),
                      "--output", "out", "--score", "0")
    assert result.returncode == 0, result.stderr
    doc = json.loads((alone / "out" / "detections.json").read_text())
    assert {c["id"]: c["name"] for c in doc["categories"]} == dict(zip(IDS, NAMES))
    assert len(doc["annotations"]) == MAX_DETS  # score_thresh 0, from the checkpoint's config
    # the same detections, ids and names as the run's own config and weights give in Python
    detector = Detector.from_config(trained["run"] / "config.yaml", weights=trained["run"] / "model_final.pth")
    (expected,) = detector.predict([read_rgb(trained["image"])])
    assert [a["category_id"] for a in doc["annotations"]] == expected["category_ids"].tolist()
    assert [a["category_name"] for a in doc["annotations"]] == [NAMES[i] for i in expected["labels"]]
    assert set(expected["category_ids"].tolist()) <= set(IDS)


def test_from_checkpoint_equals_from_config_with_the_run_config(trained):
    """Without its annotation files, the run's config.yaml (which sets model.num_classes) gives
    the checkpoint's names and ids, not "0".."4" and label + 1."""
    checkpoint = trained["alone"] / "model_final.pth"
    alone = Detector.from_checkpoint(checkpoint, device="cpu")
    with_config = Detector.from_config(trained["run"] / "config.yaml", weights=checkpoint, device="cpu")
    for detector in (alone, with_config):
        assert detector.class_names == NAMES
        assert detector.label_to_cat_id == dict(enumerate(IDS))
    rng = np.random.default_rng(0)
    images = [read_rgb(trained["image"]), rng.integers(0, 255, (96, 160, 3), dtype=np.uint8)]
    for got, want in zip(alone.predict(images), with_config.predict(images)):
        assert len(got["scores"]) == MAX_DETS
        for key in ("boxes", "scores", "labels", "category_ids"):
            assert torch.equal(got[key], want[key]), key
    assert alone.config.model.num_classes == 5 and alone.config.train.device == "auto"
    overridden = Detector.from_checkpoint(checkpoint, ["model.postprocess.max_detections=3"], device="cpu")
    assert overridden.config.model.postprocess.max_detections == 3
    assert [len(o["scores"]) for o in overridden.predict(images)] == [3, 3]


def test_eval_from_the_checkpoint_alone(trained):
    result = run_tool(trained, "eval.py", "--weights", "model_final.pth",
                      f"data.val.images={trained['val_images']}", f"data.val.annotations={trained['val_json']}")
    assert result.returncode == 0, result.stderr
    assert "Average Precision" in result.stdout and all(name in result.stdout for name in NAMES)
    eval_dir = trained["alone"] / "eval"  # beside the weights
    results = json.loads((eval_dir / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(IDS)
    # the same weights and split: the AP of the run's final evaluation
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    final = json.loads((trained["run"] / "eval" / "metrics.json").read_text())["metrics"]
    assert metrics["AP"] == pytest.approx(final["AP"])


def test_eval_refuses_a_split_with_other_classes(trained, shapes_dir):
    result = run_tool(trained, "eval.py", "--weights", "model_final.pth",
                      f"data.val.images={shapes_dir / 'val'}",
                      f"data.val.annotations={shapes_dir / 'annotations' / 'instances_val.json'}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "model_final.pth predicts 5 classes" in line and "instances_val.json has 5" in line
    assert "'ring'" in line and "'circle'" in line


def test_export_from_the_checkpoint_alone(trained):
    result = run_tool(trained, "export.py", "--weights", "model_final.pth", "--format", "torchscript",
                      "--output", "model.pt")
    assert result.returncode == 0, result.stderr
    assert "another label 0, num_detections differ 0" in result.stdout and "in any order 0" in result.stdout
    # the file is the checkpoint's model: eager Predictor of from_checkpoint, bit for bit
    detector = Detector.from_checkpoint(trained["alone"] / "model_final.pth", device="cpu")
    eager = prepare_for_export(Predictor(detector.model, postprocessor=detector.postprocessor))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        loaded = torch.jit.load(str(trained["alone"] / "model.pt"))
    images = torch.randn(2, 3, 128, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, actual = eager(images), loaded(images)
    assert expected[3].tolist() == [MAX_DETS, MAX_DETS]
    for a, b in zip(expected, actual):
        assert torch.equal(a, b)
