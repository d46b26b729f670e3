"""tools/infer.py and retinanet/inference.py: input expansion, the detections json, drawn images
and the error exits. The model has random weights (nothing is trained); with
model.postprocess.score_thresh=0 and --score 0 it still returns detections to check."""
from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import Detector
from retinanet.config import load_config
from retinanet.data import CocoDetection
from retinanet.inference import coco_bbox, expand_inputs, infer_files, output_names
from retinanet.model import build_model

from conftest import REPO_ROOT, tiny_overrides
from test_video import count_frames, make_clip

MAX_DETS = 10  # per image: keeps the json small and the count exact


@pytest.fixture(scope="module")
def setup(shapes_dir, tmp_path_factory):
    """Random weights of the tiny model, and the overrides that describe it."""
    work = tmp_path_factory.mktemp("infer")
    overrides = tiny_overrides(shapes_dir, work / "run") + [
        "model.postprocess.score_thresh=0.0", f"model.postprocess.max_detections={MAX_DETS}"]
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(config.model, 5, load_backbone_weights=False)
    weights = work / "random.pth"
    torch.save(model.state_dict(), weights)
    # a folder with 3 good images, one that does not decode and a non-image file
    mixed = work / "mixed"
    mixed.mkdir()
    for name in sorted(os.listdir(shapes_dir / "val"))[:3]:
        shutil.copy(shapes_dir / "val" / name, mixed / name)
    (mixed / "broken.png").write_bytes(b"not a png")
    (mixed / "notes.txt").write_text("ignored: not an image extension")
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in sorted((shapes_dir / "val").glob("*.png"))[:4]]
    make_clip(work / "clip.mp4", frames)
    return {"work": work, "overrides": overrides, "weights": weights, "mixed": mixed,
            "val": shapes_dir / "val", "clip": work / "clip.mp4"}


def _start(setup, input_spec, output, *extra):
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "infer.py"), "--config",
           str(REPO_ROOT / "configs" / "shapes_R18.yaml"), "--weights", str(setup["weights"]),
           "--input", str(input_spec), "--output", str(output), *extra, *setup["overrides"]]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the runs share the machine's cores
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture(scope="module")
def runs(setup):
    """The tool's runs, started together (each spends most of its time importing torch)."""
    work, mixed = setup["work"], setup["mixed"]
    procs = {
        "folder": _start(setup, setup["val"], work / "out_folder", "--score", "0.0", "--batch-size", "3"),
        "glob": _start(setup, mixed / "*", work / "out_glob", "--score", "0.0", "--skip-bad"),
        "file": _start(setup, mixed / sorted(os.listdir(mixed))[0], work / "out_file", "--score", "0.0"),
        "sliced": _start(setup, setup["val"], work / "out_sliced", "--score", "0.0", "--slice", "64", "64",
                         "--overlap", "0.25"),
        "video": _start(setup, setup["clip"], work / "out_video", "--score", "0.0", "--batch-size", "2"),
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr)
    return results


def _check_document(out_dir: Path, files: list[Path], shapes_dir: Path) -> dict:
    """The json is a COCO instances file that matches the images; returns it."""
    doc = json.loads((out_dir / "detections.json").read_text())
    assert set(doc) == {"info", "licenses", "images", "categories", "annotations"}
    dataset_cats = {c["id"]: c["name"] for c in
                    json.loads((shapes_dir / "annotations" / "instances_val.json").read_text())["categories"]}
    assert {c["id"]: c["name"] for c in doc["categories"]} == dataset_cats
    root = Path(doc["info"]["images_root"])
    assert [root / im["file_name"] for im in doc["images"]] == [f.absolute() for f in files]
    sizes = {}
    for im in doc["images"]:
        width, height = Image.open(root / im["file_name"]).size
        assert (im["width"], im["height"]) == (width, height)
        sizes[im["id"]] = (width, height)
        drawn = out_dir / im["visualization"]
        assert drawn.name == Path(im["file_name"]).stem + ".png" and drawn.is_file()
        Image.open(drawn).verify()
    per_image = {i: 0 for i in sizes}
    file_names = {im["id"]: im["file_name"] for im in doc["images"]}
    for k, ann in enumerate(doc["annotations"], 1):
        assert ann["id"] == k and ann["category_id"] in dataset_cats
        assert ann["category_name"] == dataset_cats[ann["category_id"]]
        x, y, w, h = ann["bbox"]
        width, height = sizes[ann["image_id"]]
        assert all(round(v, 2) == v for v in ann["bbox"])
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= width + 1e-6 and y + h <= height + 1e-6
        assert 0 <= ann["score"] <= 1
        assert ann["file_name"] == file_names[ann["image_id"]]
        per_image[ann["image_id"]] += 1
    # score_thresh 0 and --score 0: every image has its max_detections
    assert set(per_image.values()) == {MAX_DETS}
    # and it is a dataset this package can load (e.g. as pseudo-labels)
    loaded = CocoDetection(root, out_dir / "detections.json")
    assert sum(len(loaded.targets(i)[0]) for i in loaded.image_ids) <= len(doc["annotations"])
    return doc


def test_folder(runs, setup, shapes_dir):
    code, stdout, stderr = runs["folder"]
    assert code == 0, stderr
    files = sorted(setup["val"].glob("*.png"))
    doc = _check_document(setup["work"] / "out_folder", files, shapes_dir)
    total = len(files) * MAX_DETS
    assert (f"{len(files)} images: {total} detections above the model's score_thresh 0.0, "
            f"{total} kept with score >= 0.0") in stdout
    assert len(doc["annotations"]) == total


def test_glob_skips_unreadable_with_skip_bad(runs, setup, shapes_dir):
    code, stdout, stderr = runs["glob"]
    assert code == 0, stderr
    good = sorted(p for p in setup["mixed"].glob("*.png") if p.name != "broken.png")
    doc = _check_document(setup["work"] / "out_glob", good, shapes_dir)
    assert "3 images, 1 unreadable skipped" in stdout
    assert "broken.png" in stdout  # the warning names it
    assert doc["info"]["skipped_files"] == [str(setup["mixed"] / "broken.png")]
    assert [im["id"] for im in doc["images"]] == [0, 1, 2]  # broken.png sorts last: no gap


def test_single_file(runs, setup, shapes_dir):
    code, stdout, stderr = runs["file"]
    assert code == 0, stderr
    (only,) = sorted(setup["mixed"].glob("*.png"))[:1]
    doc = _check_document(setup["work"] / "out_file", [only], shapes_dir)
    assert doc["images"][0]["file_name"] == only.name
    assert sorted(os.listdir(setup["work"] / "out_file")) == sorted(["detections.json", only.stem + ".png"])


def test_sliced_folder(runs, setup, shapes_dir):
    """--slice runs Detector.predict(..., slice=...): the json holds its detections."""
    code, stdout, stderr = runs["sliced"]
    assert code == 0, stderr
    files = sorted(setup["val"].glob("*.png"))
    doc = _check_document(setup["work"] / "out_sliced", files, shapes_dir)
    detector = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", weights=setup["weights"],
                                    overrides=setup["overrides"])
    image = np.array(Image.open(files[0]).convert("RGB"))
    expected = detector.predict([image], slice=(64, 64, 0.25))[0]
    first = [a for a in doc["annotations"] if a["image_id"] == 0]
    assert [a["score"] for a in first] == [round(float(v), 4) for v in expected["scores"]]
    unsliced = detector.predict([image])[0]
    assert not torch.equal(expected["scores"], unsliced["scores"])


def test_video(runs, setup, shapes_dir):
    code, stdout, stderr = runs["video"]
    assert code == 0, stderr
    out = setup["work"] / "out_video"
    assert sorted(os.listdir(out)) == ["clip.mp4", "detections.json"]
    assert count_frames(out / "clip.mp4")[0] == 4
    doc = json.loads((out / "detections.json").read_text())
    assert [im["frame_index"] for im in doc["images"]] == [0, 1, 2, 3]
    assert len(doc["annotations"]) == 4 * MAX_DETS
    assert f"4 frames: {4 * MAX_DETS} detections above the model's score_thresh 0.0" in stdout
    assert f"wrote {out / 'clip.mp4'} (4 frames) and {out / 'detections.json'}" in stdout


def test_bad_overlap_exits_2_before_loading_the_model(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [
        "infer.py", "--weights", str(setup["weights"]), "--input", str(setup["val"]), "--output",
        str(tmp_path / "out"), "--slice", "64", "64", "--overlap", "1.5"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "tools" / "infer.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: slice overlap is a fraction of the tile in [0, 1), got 1.5\n"


def test_unreadable_image_exits_2_naming_it(setup, tmp_path, monkeypatch, capsys):
    # In process (torch is loaded already): the tool's own main and exit handling.
    broken = setup["mixed"] / "broken.png"
    monkeypatch.setattr(sys, "argv", [
        "infer.py", "--config", str(REPO_ROOT / "configs" / "shapes_R18.yaml"), "--weights",
        str(setup["weights"]), "--input", str(broken), "--output", str(tmp_path / "out"), *setup["overrides"]])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "tools" / "infer.py"), run_name="__main__")
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert str(broken) in stderr and "--skip-bad" in stderr


def test_a_bare_state_dict_without_config_exits_2_asking_for_one(setup, tmp_path, monkeypatch, capsys):
    # a trainer checkpoint needs no --config (tests/test_from_checkpoint.py); this file has none
    monkeypatch.setattr(sys, "argv", ["infer.py", "--weights", str(setup["weights"]), "--input",
                                      str(setup["val"]), "--output", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "tools" / "infer.py"), run_name="__main__")
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"error: {setup['weights']} carries no config") and stderr.count("\n") == 1
    assert "pass the config of its model (--config" in stderr
    assert not (tmp_path / "out").exists()


def test_no_match_exits_2_naming_the_pattern(setup, tmp_path):
    pattern = str(tmp_path / "nothing" / "*.jpg")
    proc = _start(setup, pattern, tmp_path / "out")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip() == f"error: no image files match the pattern {pattern}"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The library functions, in process
# ---------------------------------------------------------------------------------------------
def test_expand_inputs(setup, tmp_path):
    mixed = setup["mixed"]
    pngs = sorted(mixed.glob("*.png"))
    assert expand_inputs(mixed) == (pngs, mixed)  # notes.txt left out
    assert expand_inputs(pngs[0]) == ([pngs[0]], mixed)
    files, root = expand_inputs(str(mixed / "0*.png"))
    assert files == pngs[:3] and root == mixed.absolute()
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    shutil.copy(pngs[0], nested / "x.PNG")
    shutil.copy(pngs[1], tmp_path / "a" / "y.jpg")
    files, root = expand_inputs(str(tmp_path / "**" / "*"))
    assert files == [tmp_path / "a" / "b" / "x.PNG", tmp_path / "a" / "y.jpg"] and root == tmp_path / "a"
    with pytest.raises(FileNotFoundError, match=r"none with an image extension"):
        expand_inputs(str(mixed / "*.txt"))
    with pytest.raises(FileNotFoundError, match="input not found: .*missing.png"):
        expand_inputs(tmp_path / "missing.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files .* in folder"):
        expand_inputs(tmp_path / "empty")


def test_output_names_and_bbox_rounding():
    assert output_names([Path("a/x.jpg"), Path("b/x.png"), Path("X.bmp"), Path("y.png")]) == \
        ["x.png", "x_1.png", "X_2.png", "y.png"]
    # corners rounded first: a box ending at the image edge stays inside it
    x, y, w, h = coco_bbox([1.006, 2.004, 128.0, 63.999])
    assert x + w <= 128.0 + 1e-9 and y + h <= 64.0 + 1e-9 and (x, y) == (1.01, 2.0)


def test_score_filter_and_overwrite_guard(setup, tmp_path):
    detector = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", weights=setup["weights"],
                                    overrides=setup["overrides"])
    files, root = expand_inputs(setup["mixed"] / "0*.png")
    files = files[:2]
    everything = infer_files(detector, files, root, tmp_path / "all", score_thresh=0.0, draw=False)
    scores = np.array([a["score"] for a in everything.document["annotations"]])
    thresh = float(np.median(scores))
    some = infer_files(detector, files, root, tmp_path / "some", score_thresh=thresh, batch_size=2,
                       draw=False)
    assert some.num_detections == everything.num_detections == len(files) * MAX_DETS
    # kept = detections at or above the threshold (compared before the json's rounding)
    assert 0 < some.num_kept < some.num_detections
    assert some.num_kept == len(some.document["annotations"])
    assert all(a["score"] >= round(thresh, 4) for a in some.document["annotations"])
    assert sum(some.kept_per_class.values()) == some.num_kept
    with pytest.raises(ValueError, match="would overwrite an input image"):
        infer_files(detector, files, root, setup["mixed"], draw=False)
