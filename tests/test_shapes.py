"""Tests for the synthetic shapes dataset (retinanet/data/shapes.py and scripts/make_shapes.py)."""

import hashlib
import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from retinanet.data.shapes import (
    BACKGROUNDS,
    CLASS_NAMES,
    SHAPE_NAMES,
    generate_shapes_dataset,
    is_complete,
    render_image,
)
from retinanet.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=20, num_val=8, image_size=96, seed=0)
RENDER = dict(image_size=128, min_size=8, max_size=64, max_objects=6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    paths = generate_shapes_dataset(out, **SMALL)
    return out, paths


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _dir_bytes(out: Path) -> dict:
    """Relative path -> bytes for every file under `out`."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _render_many(n, **overrides):
    kwargs = {**RENDER, **overrides}
    return [render_image(np.random.default_rng(i), **kwargs) for i in range(n)]


# --------------------------------------------------------------------------- COCO json


def test_returns_paths_and_writes_layout(dataset):
    out, paths = dataset
    assert set(paths) == {"train", "val"}
    for split, num in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        assert Path(paths[split]) == out / "annotations" / f"instances_{split}.json"
        assert len(list((out / split).glob("*.png"))) == num
    assert (out / "meta.json").is_file()


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_json_is_valid(dataset, split):
    out, paths = dataset
    coco = COCO(paths[split])
    raw = _load(paths[split])
    assert {"info", "licenses", "images", "annotations", "categories"} <= raw.keys()
    assert raw["licenses"] == []
    assert {"description", "version", "year", "date_created"} <= raw["info"].keys()

    cats = raw["categories"]
    assert [c["id"] for c in cats] == [1, 2, 3, 4, 5]
    assert tuple(c["name"] for c in cats) == CLASS_NAMES
    assert all(c["supercategory"] == "shape" for c in cats)

    img_ids = [im["id"] for im in raw["images"]]
    assert img_ids == list(range(1, len(img_ids) + 1))
    ann_ids = [a["id"] for a in raw["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) == 1
    assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
    assert len(coco.getAnnIds()) == len(ann_ids) > 0

    for im in raw["images"]:
        path = out / split / im["file_name"]
        with Image.open(path) as pil:
            assert pil.mode == "RGB"
            assert pil.size == (im["width"], im["height"])
    for a in raw["annotations"]:
        assert a["iscrowd"] == 0
        assert a["category_id"] in range(1, 6)
        assert a["image_id"] in coco.imgs
        w, h = a["bbox"][2:]
        assert a["area"] == pytest.approx(w * h, abs=0.01)


def test_bboxes_positive_and_inside_image(dataset):
    _, paths = dataset
    for path in paths.values():
        raw = _load(path)
        images = {im["id"]: im for im in raw["images"]}
        for a in raw["annotations"]:
            x, y, w, h = a["bbox"]
            im = images[a["image_id"]]
            assert w > 0 and h > 0
            assert x >= 0 and y >= 0
            assert x + w <= im["width"] + 1e-6 and y + h <= im["height"] + 1e-6


# --------------------------------------------------------------------------- rendering


def _background_colour(image):
    """Most frequent colour: the plain background (shapes cover much less than half)."""
    colours, counts = np.unique(image.reshape(-1, 3), axis=0, return_counts=True)
    return colours[counts.argmax()]


def _assert_boxes_tight(image, objects):
    """Every changed pixel lies in a box and each shape reaches every side of its box."""
    h, w = image.shape[:2]
    differs = np.any(image != _background_colour(image), axis=2)
    rows, cols = np.nonzero(differs)

    # Every changed pixel [c, c+1) x [r, r+1) overlaps some box grown by 1 px.
    boxes = np.array([b for _, b in objects]).reshape(-1, 4)
    overlaps = (
        (cols[:, None] + 1 > boxes[None, :, 0] - 1) & (cols[:, None] < boxes[None, :, 2] + 1)
        & (rows[:, None] + 1 > boxes[None, :, 1] - 1) & (rows[:, None] < boxes[None, :, 3] + 1)
    )
    assert overlaps.any(axis=1).all(), "pixels changed outside every box"

    # Each shape reaches every side of its box (within 1.5 px). Objects are >= 2 px
    # apart, so the 1-px-grown window around a box sees only its own shape.
    for name, (x0, y0, x1, y1) in objects:
        c0, r0 = max(int(np.floor(x0)) - 1, 0), max(int(np.floor(y0)) - 1, 0)
        c1, r1 = min(int(np.ceil(x1)) + 1, w), min(int(np.ceil(y1)) + 1, h)
        wr, wc = np.nonzero(differs[r0:r1, c0:c1])
        assert len(wr) > 0, name
        assert abs(c0 + wc.min() - x0) <= 1.5, (name, "left")
        assert abs(c0 + wc.max() + 1 - x1) <= 1.5, (name, "right")
        assert abs(r0 + wr.min() - y0) <= 1.5, (name, "top")
        assert abs(r0 + wr.max() + 1 - y1) <= 1.5, (name, "bottom")


@pytest.mark.parametrize("seed", range(12))
def test_boxes_are_tight_on_plain_background(seed):
    image, objects = render_image(np.random.default_rng(seed), background="solid", **RENDER)
    _assert_boxes_tight(image, objects)


NEW_SHAPES = ("diamond", "hexagon", "ell")


@pytest.mark.parametrize("name", NEW_SHAPES)
def test_new_shapes_boxes_are_tight(name):
    drawn = 0
    for seed in range(4):
        image, objects = render_image(np.random.default_rng(seed), background="solid",
                                      **{**RENDER, "classes": (name,)})
        assert {n for n, _ in objects} <= {name}
        _assert_boxes_tight(image, objects)
        drawn += len(objects)
    assert drawn >= 8


def _single(name, seed, size=48.0):
    """One `size` px object of class `name` on a plain 64 px image -> (coverage, box): coverage is
    each pixel's colour distance to the background over the shape's own (its interior's), 0..1."""
    for offset in range(10):  # ~3% of images are empty: take the next seed then
        image, objects = render_image(np.random.default_rng(1000 * seed + offset), image_size=64, min_size=size,
                                      max_size=size, max_objects=1, classes=(name,), background="solid")
        if objects:
            break
    (_, box), = objects
    distance = np.abs(image.astype(float) - _background_colour(image)).sum(axis=2)
    return distance / distance.max(), box


@pytest.mark.parametrize("name, fill", [("diamond", 1 / 2), ("hexagon", 3 / 4), ("ell", 5 / 9)])
def test_new_shapes_fill_their_box_as_their_geometry_says(name, fill):
    """Area / box area: diamond 1/2, regular hexagon 3/4 (either rotation), L with arms of size / 3: 5/9."""
    for seed in range(3):
        coverage, (x0, y0, x1, y1) = _single(name, seed)
        assert max(x1 - x0, y1 - y0) == pytest.approx(48.0)
        assert coverage.sum() / ((x1 - x0) * (y1 - y0)) == pytest.approx(fill, abs=0.01), (name, seed)


def test_hexagon_and_ell_orientations():
    """Hexagons come with a vertex or a flat side on top (box aspect 2/sqrt(3) either way round);
    an ell's empty quarter is any of the four box corners."""
    aspects, empty_corners = set(), set()
    for seed in range(12):
        _, (x0, y0, x1, y1) = _single("hexagon", seed)
        aspects.add(round((y1 - y0) / (x1 - x0), 3))
        coverage, (x0, y0, x1, y1) = _single("ell", seed)
        cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
        quarters = {(0, 0): coverage[int(y0):cy, int(x0):cx], (1, 0): coverage[int(y0):cy, cx:int(x1)],
                    (0, 1): coverage[cy:int(y1), int(x0):cx], (1, 1): coverage[cy:int(y1), cx:int(x1)]}
        emptiest = min(quarters, key=lambda k: quarters[k].mean())
        assert quarters[emptiest].mean() < 0.5 < min(q.mean() for k, q in quarters.items() if k != emptiest)
        empty_corners.add(emptiest)
    assert aspects == {round(2 / np.sqrt(3), 3), round(np.sqrt(3) / 2, 3)}
    assert empty_corners == {(0, 0), (1, 0), (0, 1), (1, 1)}


def test_all_backgrounds_and_classes_render():
    seen = set()
    for bg in BACKGROUNDS:
        for seed in range(5):
            image, objects = render_image(np.random.default_rng(seed), background=bg, **RENDER)
            assert image.shape == (128, 128, 3) and image.dtype == np.uint8
            seen.update(name for name, _ in objects)
    assert seen == set(CLASS_NAMES)


def test_object_sizes_respect_range():
    sides = [max(x1 - x0, y1 - y0) for _, objs in _render_many(100) for _, (x0, y0, x1, y1) in objs]
    assert min(sides) >= 8 - 1e-6 and max(sides) <= 64 + 1e-6
    # Log-uniform: both small and large objects occur.
    assert min(sides) < 12 and max(sides) > 48


def test_max_size_is_capped_by_image():
    for _, objs in _render_many(20, image_size=(40, 200), min_size=8, max_size=100):
        for _, (x0, y0, x1, y1) in objs:
            assert max(x1 - x0, y1 - y0) <= 40 + 1e-6


def test_objects_do_not_overlap_and_stay_inside():
    for image, objs in _render_many(100):
        h, w = image.shape[:2]
        for _, (x0, y0, x1, y1) in objs:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        for (_, a), (_, b) in combinations(objs, 2):
            gap_x = max(b[0] - a[2], a[0] - b[2])
            gap_y = max(b[1] - a[3], a[1] - b[3])
            assert max(gap_x, gap_y) >= 2 - 1e-9, (a, b)


def test_object_counts():
    counts = [len(objs) for _, objs in _render_many(300)]
    assert max(counts) <= 6
    assert 0 < counts.count(0) < 30  # a few empty images (~3%)
    assert np.mean(counts) > 2


def test_render_non_square():
    image, objects = render_image(np.random.default_rng(0), **{**RENDER, "image_size": (64, 160)})
    assert image.shape == (64, 160, 3)
    for _, (x0, y0, x1, y1) in objects:
        assert x1 <= 160 and y1 <= 64


def test_dataset_non_square(tmp_path):
    paths = generate_shapes_dataset(tmp_path, num_train=6, num_val=3, image_size=(48, 80), max_size=32)
    raw = _load(paths["train"])
    assert all(im["width"] == 80 and im["height"] == 48 for im in raw["images"])
    with Image.open(tmp_path / "train" / raw["images"][0]["file_name"]) as pil:
        assert pil.size == (80, 48)
    for a in raw["annotations"]:
        x, y, w, h = a["bbox"]
        assert x + w <= 80 + 1e-6 and y + h <= 48 + 1e-6


# --------------------------------------------------------------------------- determinism


def test_deterministic_bytes(dataset, tmp_path):
    out, _ = dataset
    generate_shapes_dataset(tmp_path, **SMALL)
    assert _dir_bytes(tmp_path) == _dir_bytes(out)


def test_seed_changes_output(dataset, tmp_path):
    out, paths = dataset
    other = generate_shapes_dataset(tmp_path, **{**SMALL, "seed": 1})
    assert _load(other["train"])["annotations"] != _load(paths["train"])["annotations"]
    assert (tmp_path / "train" / "000001.png").read_bytes() != (out / "train" / "000001.png").read_bytes()


def test_train_and_val_differ(dataset):
    out, paths = dataset
    assert (out / "train" / "000001.png").read_bytes() != (out / "val" / "000001.png").read_bytes()
    train_boxes = [a["bbox"] for a in _load(paths["train"])["annotations"]]
    val_boxes = [a["bbox"] for a in _load(paths["val"])["annotations"]]
    assert not set(map(tuple, train_boxes)) & set(map(tuple, val_boxes))


def test_images_independent_of_split_length(dataset, tmp_path):
    """Image k is the same whatever the split size (per-image child seeds)."""
    out, _ = dataset
    generate_shapes_dataset(tmp_path, **{**SMALL, "num_train": 5, "num_val": 2})
    for name in ("000001.png", "000005.png"):
        assert (tmp_path / "train" / name).read_bytes() == (out / "train" / name).read_bytes()


# --------------------------------------------------------------------------- completeness + CLI


def test_is_complete(dataset, tmp_path):
    out, _ = dataset
    assert is_complete(out, **SMALL)
    assert not is_complete(out, **{**SMALL, "num_train": 21})
    assert not is_complete(out, **{**SMALL, "seed": 1})
    assert not is_complete(out, **{**SMALL, "image_size": (96, 97)})
    assert not is_complete(out, **{**SMALL, "max_objects": 5})
    assert not is_complete(tmp_path, **SMALL)


def test_is_complete_detects_missing_files(tmp_path):
    params = dict(num_train=3, num_val=2, image_size=32, max_size=16)
    generate_shapes_dataset(tmp_path, **params)
    assert is_complete(tmp_path, **params)
    assert is_complete(tmp_path, **{**params, "image_size": (32, 32)})  # same size, other spelling
    (tmp_path / "val" / "000002.png").unlink()
    assert not is_complete(tmp_path, **params)


def test_regeneration_removes_stale_images(tmp_path):
    generate_shapes_dataset(tmp_path, num_train=5, num_val=2, image_size=32, max_size=16)
    generate_shapes_dataset(tmp_path, num_train=3, num_val=2, image_size=32, max_size=16)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.png")) == [
        "000001.png", "000002.png", "000003.png"]


def _run_cli(*args):
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "make_shapes.py"), *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find the package itself
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_cli_generates_then_skips(tmp_path):
    out = tmp_path / "shapes"
    args = ["--out", str(out), "--num-train", "4", "--num-val", "2", "--size", "48x64", "--seed", "3"]
    first = _run_cli(*args)
    assert "Generating" in first
    assert is_complete(out, num_train=4, num_val=2, image_size=(48, 64), seed=3)
    watched = [out / "meta.json", out / "annotations" / "instances_train.json", out / "train" / "000001.png"]
    mtimes = [p.stat().st_mtime_ns for p in watched]

    second = _run_cli(*args)
    assert "already complete" in second and "Generating" not in second
    assert [p.stat().st_mtime_ns for p in watched] == mtimes

    third = _run_cli(*args, "--force")
    assert "Generating" in third
    assert is_complete(out, num_train=4, num_val=2, image_size=(48, 64), seed=3)


# --------------------------------------------------------------------------- options


def test_classes_backgrounds_and_object_counts_options():
    kwargs = dict(min_size=8, max_size=16, min_objects=4, max_objects=7, classes=("star", "circle"),
                  backgrounds=("solid",))
    rendered = _render_many(60, **kwargs)
    names = {name for _, objs in rendered for name, _ in objs}
    assert names == {"star", "circle"}
    counts = [len(objs) for _, objs in rendered]
    assert max(counts) <= 7 and sorted(set(counts) - {0})[0] >= 4  # small objects always fit
    for image, _ in rendered:  # one flat colour covers most of every image
        assert np.mean(np.all(image == _background_colour(image), axis=2)) > 0.5


def test_options_reach_the_dataset_and_meta(tmp_path):
    paths = generate_shapes_dataset(tmp_path, num_train=4, num_val=0, image_size=64, max_size=16,
                                    classes=["star", "circle"], backgrounds=["noise"], min_objects=2)
    raw = _load(paths["train"])
    assert [(c["id"], c["name"]) for c in raw["categories"]] == [(1, "star"), (2, "circle")]
    assert {a["category_id"] for a in raw["annotations"]} <= {1, 2}
    meta = _load(tmp_path / "meta.json")
    assert meta["classes"] == ["star", "circle"] and meta["backgrounds"] == ["noise"]
    assert meta["min_objects"] == 2
    assert is_complete(tmp_path, num_train=4, num_val=0, image_size=64, max_size=16,
                       classes=["star", "circle"], backgrounds=["noise"], min_objects=2)
    assert not is_complete(tmp_path, num_train=4, num_val=0, image_size=64, max_size=16)


def test_default_meta_keeps_its_keys(dataset):
    """The options added later are not written at their defaults: a dataset generated before
    them stays complete, byte for byte."""
    out, _ = dataset
    assert set(_load(out / "meta.json")) == {"generator_version", "num_train", "num_val", "image_size",
                                             "min_size", "max_size", "max_objects", "seed"}


@pytest.mark.parametrize("bad", [dict(classes=["octagon"]), dict(classes=[]), dict(backgrounds=["plaid"]),
                                 dict(classes=["star", "star"])])
def test_unknown_classes_or_backgrounds_are_config_errors(bad):
    with pytest.raises(ConfigError, match="must be distinct names"):
        render_image(np.random.default_rng(0), **{**RENDER, **bad})


def test_cli_options(tmp_path):
    out = tmp_path / "large"
    _run_cli("--out", str(out), "--num-train", "0", "--num-val", "2", "--size", "256", "--min-size", "8",
             "--max-size", "24", "--min-objects", "20", "--max-objects", "30", "--classes", "square", "cross",
             "--backgrounds", "solid", "gradient")
    raw = _load(out / "annotations" / "instances_val.json")
    assert [c["name"] for c in raw["categories"]] == ["square", "cross"]
    per_image = np.bincount([a["image_id"] for a in raw["annotations"]], minlength=3)[1:]
    assert all(n == 0 or n >= 15 for n in per_image) and per_image.max() <= 30  # few placements fail
    sides = [max(a["bbox"][2:]) for a in raw["annotations"]]
    assert min(sides) >= 8 - 0.01 and max(sides) <= 24 + 0.01


# --------------------------------------------------------------------------- extra shapes


def test_shape_names_extend_the_default_classes():
    assert CLASS_NAMES == ("circle", "square", "triangle", "star", "cross")
    assert SHAPE_NAMES == CLASS_NAMES + NEW_SHAPES


# sha256 of meta.json + both annotation files of generate_shapes_dataset(**SMALL), written by the
# generator before diamond/hexagon/ell existed (commit c11dba3). If a numpy upgrade changes its
# random streams this fails for every set alike: regenerate data/shapes and update it.
SMALL_DEFAULT_SHA256 = "2c445674304338c9f40d7f09699fef07db0befe0507d549e2e7827ca7184ec4d"


def test_default_dataset_unchanged_by_the_extra_shapes(dataset, tmp_path):
    out, _ = dataset
    digest = hashlib.sha256()
    for name in ("meta.json", "annotations/instances_train.json", "annotations/instances_val.json"):
        digest.update((out / name).read_bytes())
    assert digest.hexdigest() == SMALL_DEFAULT_SHA256
    generate_shapes_dataset(tmp_path, **SMALL, classes=list(CLASS_NAMES))  # the defaults, spelt out
    assert _dir_bytes(tmp_path) == _dir_bytes(out)


def test_cli_accepts_the_extra_shapes(tmp_path):
    out = tmp_path / "other"
    classes = ["circle", "diamond", "hexagon", "triangle", "cross", "ell"]
    _run_cli("--out", str(out), "--num-train", "3", "--num-val", "0", "--size", "64", "--max-size", "24",
             "--min-objects", "4", "--classes", *classes)
    raw = _load(out / "annotations" / "instances_train.json")
    assert [(c["id"], c["name"]) for c in raw["categories"]] == list(enumerate(classes, start=1))
    assert {a["category_id"] for a in raw["annotations"]} <= set(range(1, 7)) and raw["annotations"]
    assert _load(out / "meta.json")["classes"] == classes
    assert is_complete(out, num_train=3, num_val=0, image_size=64, max_size=24, min_objects=4, classes=classes)


def test_cli_rejects_an_unknown_shape(tmp_path):
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "make_shapes.py"), "--out", str(tmp_path / "x"),
           "--classes", "circle", "octagon"]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "octagon" in res.stderr and "hexagon" in res.stderr
    assert not (tmp_path / "x").exists()
