"""Dataset formats (retinanet.data.formats, voc, yolo): a generated COCO set written here as Pascal
VOC and as YOLO, read back -> the same boxes within each format's rounding and the same AP from
the evaluator; every kind of bad input named by its file and line; difficult objects ignored;
the deterministic train/val split; tools/convert_dataset.py as a subprocess."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from retinanet.config import ConfigError, load_config
from retinanet.data import CocoDetection, build_dataset, load_coco
from retinanet.data.formats import (check_dataset, coco_json, detect_format, load_dataset,
                                    read_dataset, split_dataset)
from retinanet.data.shapes import generate_shapes_dataset
from retinanet.engine.evaluator import coco_evaluate
from retinanet.errors import DataError, MissingFileError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONVERT = REPO_ROOT / "tools" / "convert_dataset.py"
YOLO_DECIMALS = 6
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


# ------------------------------------------------------------------------------------------------
# Writers (what a user's VOC / YOLO export holds) and comparisons
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, dict]:
    """(image folder, COCO dict) of 8 generated 48 x 64 images (not square: catches swapped sides)."""
    out = tmp_path_factory.mktemp("shapes")
    paths = generate_shapes_dataset(out, num_train=8, num_val=1, image_size=(48, 64), seed=7)
    return out / "train", json.loads(Path(paths["train"]).read_text())


def snapped(dataset: dict) -> dict:
    """The dataset with box edges rounded to whole pixels: what VOC's integer corners hold exactly."""
    anns = []
    for ann in dataset["annotations"]:
        x0, y0 = round(ann["bbox"][0]), round(ann["bbox"][1])
        x1, y1 = round(ann["bbox"][0] + ann["bbox"][2]), round(ann["bbox"][1] + ann["bbox"][3])
        anns.append({**ann, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    return {**dataset, "annotations": anns}


def names(dataset: dict) -> dict[int, str]:
    return {c["id"]: c["name"] for c in dataset["categories"]}


def voc_xml(file_name: str, width: int, height: int, objects: list[tuple]) -> str:
    """objects: (name, xmin, ymin, xmax, ymax, difficult), VOC's 1-based inclusive corners."""
    text = [f"<annotation>\n  <filename>{file_name}</filename>\n  <size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>"]
    for name, xmin, ymin, xmax, ymax, difficult in objects:
        text.append(f"  <object>\n    <name>{name}</name>\n    <difficult>{int(difficult)}</difficult>\n"
                    f"    <bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                    f"<ymax>{ymax}</ymax></bndbox>\n  </object>")
    return "\n".join(text + ["</annotation>\n"])


def write_voc(dataset: dict, images_dir: Path, root: Path, difficult: set = frozenset()) -> Path:
    """root/{JPEGImages, Annotations, ImageSets/Main/all.txt}: corners rounded to whole pixels,
    xmin = x + 1 and xmax = x + w (detectron2's reading inverted); annotation ids in `difficult`
    marked difficult."""
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    by_image = {i["id"]: [] for i in dataset["images"]}
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        by_image[ann["image_id"]].append((names(dataset)[ann["category_id"]], round(x) + 1,
                                          round(y) + 1, round(x + w), round(y + h), ann["id"] in difficult))
    for image in dataset["images"]:
        shutil.copy(images_dir / image["file_name"], root / "JPEGImages" / image["file_name"])
        (root / "Annotations" / f"{Path(image['file_name']).stem}.xml").write_text(
            voc_xml(image["file_name"], image["width"], image["height"], by_image[image["id"]]))
    (root / "ImageSets" / "Main" / "all.txt").write_text(
        "".join(f"{Path(i['file_name']).stem}\n" for i in dataset["images"]))
    return root


def write_yolo(dataset: dict, images_dir: Path, root: Path, split: str = "train") -> Path:
    """root/{images, labels}/<split> and root/data.yaml; normalised values with YOLO_DECIMALS."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    cat_ids = sorted(names(dataset))
    (root / "data.yaml").write_text(json.dumps({"names": [names(dataset)[c] for c in cat_ids]}))
    images = {i["id"]: i for i in dataset["images"]}
    lines = {i: [] for i in images}
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        W, H = images[ann["image_id"]]["width"], images[ann["image_id"]]["height"]
        values = ((x + w / 2) / W, (y + h / 2) / H, w / W, h / H)
        lines[ann["image_id"]].append(f"{cat_ids.index(ann['category_id'])} " +
                                      " ".join(f"{v:.{YOLO_DECIMALS}f}" for v in values))
    for image_id, image in images.items():
        shutil.copy(images_dir / image["file_name"], root / "images" / split / image["file_name"])
        (root / "labels" / split / f"{Path(image['file_name']).stem}.txt").write_text(
            "".join(line + "\n" for line in lines[image_id]))
    return root


def boxes_by_file(dataset: dict) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    """file_name -> [(class name, xyxy float64, iscrowd)]."""
    files = {i["id"]: i["file_name"] for i in dataset["images"]}
    out = {name: [] for name in files.values()}
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        out[files[ann["image_id"]]].append((names(dataset)[ann["category_id"]],
                                            np.array([x, y, x + w, y + h], np.float64), ann["iscrowd"]))
    return out


def assert_same_boxes(original: dict, loaded: dict, bound: float) -> None:
    """Every image with the same size, and a one-to-one match of its boxes (same class, crowd
    flag, every edge within `bound` px)."""
    sizes = {i["file_name"]: (i["width"], i["height"]) for i in original["images"]}
    assert {i["file_name"]: (i["width"], i["height"]) for i in loaded["images"]} == sizes
    got = boxes_by_file(loaded)
    for file_name, expected in boxes_by_file(original).items():
        assert len(got[file_name]) == len(expected), file_name
        unmatched = list(got[file_name])
        for name, box, crowd in expected:
            match = min(unmatched, key=lambda b: np.abs(b[1] - box).max() + 1e9 * (b[0] != name))
            assert match[0] == name and match[2] == crowd
            assert np.abs(match[1] - box).max() <= bound, (file_name, box, match[1])
            unmatched.remove(match)


def fixed_detections(dataset: dict, seed: int = 0) -> list[tuple[str, str, list[float], float]]:
    """(file_name, class name, xywh, score): each box moved by up to 30 % of its size, and a
    false positive per image."""
    rng = np.random.default_rng(seed)
    detections = []
    for file_name, boxes in boxes_by_file(dataset).items():
        for name, (x0, y0, x1, y1), _ in boxes:
            w, h = x1 - x0, y1 - y0
            dx, dy, dw, dh = rng.uniform(-0.3, 0.3, 4) * [w, h, w, h]
            detections.append((file_name, name, [x0 + dx, y0 + dy, w + dw, h + dh], rng.uniform()))
        detections.append((file_name, "square", [*rng.uniform(0, 30, 2), 12.0, 9.0], rng.uniform()))
    return detections


def evaluate(dataset: dict, detections: list) -> dict:
    """coco_evaluate of `detections`, mapped onto the dataset's own image and category ids."""
    image_ids = {i["file_name"]: i["id"] for i in dataset["images"]}
    cat_ids = {name: c for c, name in names(dataset).items()}
    results = [{"image_id": image_ids[f], "category_id": cat_ids[n], "bbox": b, "score": s}
               for f, n, b, s in detections if n in cat_ids]
    return coco_evaluate(load_coco("<memory>", json.loads(json.dumps(coco_json(dataset)))), results)


def overlap(a: list[float], b: list[float]) -> bool:
    """Whether two xywh boxes intersect."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def iou_margin(dataset: dict, detections: list) -> float:
    """The smallest distance of a detection-to-box IoU (same image and class) from an AP
    threshold: boxes moved by less than this in IoU score the same."""
    boxes, margin = boxes_by_file(dataset), 1.0
    for file_name, name, (x, y, w, h), _ in detections:
        for gt_name, (x0, y0, x1, y1), _ in boxes[file_name]:
            if gt_name == name:
                iw = max(0.0, min(x + w, x1) - max(x, x0))
                ih = max(0.0, min(y + h, y1) - max(y, y0))
                iou = iw * ih / (w * h + (x1 - x0) * (y1 - y0) - iw * ih)
                margin = min(margin, float(np.abs(IOU_THRESHOLDS - iou).min()))
    return margin


# ------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------
def test_voc_round_trip_gives_the_same_boxes_and_the_same_ap(shapes, tmp_path):
    images_dir, original = shapes
    original = snapped(original)  # VOC holds whole pixels: these boxes survive exactly
    root = write_voc(original, images_dir, tmp_path / "VOC")
    loaded, problems = read_dataset(root / "JPEGImages", root / "Annotations")
    assert problems == [] and detect_format(root / "Annotations") == "voc"
    assert [c["name"] for c in loaded["categories"]] == sorted(names(original).values())
    assert_same_boxes(original, loaded, bound=0.0)
    detections = fixed_detections(original)
    expected, got = evaluate(original, detections), evaluate(loaded, detections)
    assert got["metrics"] == expected["metrics"] and got["per_class"] == expected["per_class"]
    assert 0 < expected["metrics"]["AP"] < 1


def test_voc_corners_are_whole_pixels_within_half_a_pixel(shapes, tmp_path):
    """Unrounded boxes: each edge moves to the nearest whole pixel, at most 0.5 px (plus the
    float round-off of x + w in the generated json)."""
    images_dir, original = shapes
    assert any(v != round(v) for a in original["annotations"] for v in a["bbox"])
    root = write_voc(original, images_dir, tmp_path / "VOC")
    loaded, problems = read_dataset(root / "JPEGImages", root / "Annotations", "voc")
    assert problems == []
    assert_same_boxes(original, loaded, bound=0.5 + 1e-9)


def test_yolo_round_trip_gives_the_same_boxes_and_the_same_ap(shapes, tmp_path):
    images_dir, original = shapes
    original = snapped(original)
    root = write_yolo(original, images_dir, tmp_path / "yolo")
    loaded, problems = read_dataset(root / "images" / "train", root / "data.yaml")
    assert problems == [] and detect_format(root / "data.yaml") == "yolo"
    in_id_order = sorted(original["categories"], key=lambda c: c["id"])
    assert loaded["categories"] == [{"id": i + 1, "name": c["name"]} for i, c in enumerate(in_id_order)]
    # Each written value is within 0.5e-6 of the exact one: an edge cx -/+ w/2 is off by at most
    # 0.75e-6 of the image side (64 px here), plus double rounding far below that.
    bound = 0.75 * 10.0 ** -YOLO_DECIMALS * 64 + 1e-9
    assert_same_boxes(original, loaded, bound=bound)
    detections = fixed_detections(original)
    # Edges moved by < 1e-4 px change an IoU of boxes >= 8 px by < 1e-4: no IoU crosses an AP
    # threshold when all are farther than that from one.
    assert iou_margin(original, detections) > 1e-3
    expected, got = evaluate(original, detections), evaluate(loaded, detections)
    # The size buckets (APs / APm / APl) read the stored area, and a 32 x 32 box sits on the
    # small / medium boundary (1024 px^2) that 1e-4 px can cross: the "all" figures must agree.
    for name in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert got["metrics"][name] == expected["metrics"][name], name
    assert got["per_class"] == expected["per_class"]


def test_the_layouts_each_format_takes(shapes, tmp_path):
    images_dir, original = shapes
    voc = write_voc(original, images_dir, tmp_path / "VOC")
    yolo = write_yolo(original, images_dir, tmp_path / "yolo")
    reference, _ = read_dataset(voc / "JPEGImages", voc / "Annotations")
    # VOC: its root, an ImageSets/Main list, XML files beside the images.
    for annotations in (voc, voc / "ImageSets" / "Main" / "all.txt"):
        assert detect_format(annotations) == "voc"
        assert coco_json(read_dataset(voc / "JPEGImages", annotations)[0])["annotations"] == \
            coco_json(reference)["annotations"]
    beside = tmp_path / "beside"
    shutil.copytree(voc / "JPEGImages", beside)
    for xml in (voc / "Annotations").glob("*.xml"):
        shutil.copy(xml, beside)
    assert coco_json(read_dataset(beside, beside)[0])["annotations"] == coco_json(reference)["annotations"]
    # An ImageSets list selects its lines' images.
    chosen = [original["images"][3]["file_name"], original["images"][1]["file_name"]]
    (voc / "ImageSets" / "Main" / "two.txt").write_text(f"{Path(chosen[0]).stem}\n\n{Path(chosen[1]).stem}\n")
    two, problems = read_dataset(voc / "JPEGImages", voc / "ImageSets" / "Main" / "two.txt")
    assert [i["file_name"] for i in two["images"]] == chosen and problems == []
    # YOLO: the labels folder, names from the data.yaml above it or from data.classes.
    from_yaml, _ = read_dataset(yolo / "images" / "train", yolo / "data.yaml")
    labels = yolo / "labels" / "train"
    assert detect_format(labels) == "yolo"
    assert read_dataset(yolo / "images" / "train", labels)[0]["annotations"] == from_yaml["annotations"]
    (yolo / "data.yaml").unlink()
    with pytest.raises(ConfigError, match="set data.classes"):
        read_dataset(yolo / "images" / "train", labels)
    class_names = [c["name"] for c in from_yaml["categories"]]
    assert read_dataset(yolo / "images" / "train", labels, classes=class_names)[0]["categories"] == \
        from_yaml["categories"]
    (tmp_path / "x.json").write_text("{}")
    assert detect_format(tmp_path / "x.json") == "coco"
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        detect_format(images_dir)  # PNGs only
    with pytest.raises(MissingFileError):
        read_dataset(images_dir, tmp_path / "nowhere")


def test_yolo_images_without_labels_are_negatives_and_dict_names(tmp_path):
    root = tiny_yolo(tmp_path, ["1 0.5 0.5 0.25 0.5"], names="{0: cat, 1: dog}")
    cv2.imwrite(str(root / "images" / "train" / "b.png"), np.zeros((20, 30, 3), np.uint8))
    dataset, problems = read_dataset(root / "images" / "train", root / "data.yaml")
    assert problems == [] and [c["name"] for c in dataset["categories"]] == ["cat", "dog"]
    assert [(i["file_name"], i["width"], i["height"]) for i in dataset["images"]] == \
        [("a.png", 40, 20), ("b.png", 30, 20)]
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in dataset["annotations"]] == \
        [(1, 2, [15.0, 5.0, 10.0, 10.0])]


def test_voc_classes_fix_the_order_and_the_set(tmp_path):
    root = tiny_voc(tmp_path, [("dog", 1, 1, 10, 10, 0), ("cat", 5, 5, 20, 15, 0)])
    dataset, problems = read_dataset(root / "JPEGImages", root / "Annotations", classes=["dog", "cat", "cow"])
    assert problems == []
    assert dataset["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"},
                                     {"id": 3, "name": "cow"}]
    assert [(a["category_id"], a["bbox"]) for a in dataset["annotations"]] == \
        [(1, [0.0, 0.0, 10.0, 10.0]), (2, [4.0, 4.0, 16.0, 11.0])]


def test_difficult_objects_are_ignored_in_training_and_evaluation(shapes, tmp_path):
    """Difficult objects are crowd regions: not in the training targets; in evaluation a
    detection on one neither counts nor costs, and missing one costs nothing."""
    images_dir, original = shapes
    original = snapped(original)
    difficult = {a["id"] for a in original["annotations"][::3]}
    root = write_voc(original, images_dir, tmp_path / "VOC", difficult=difficult)
    loaded, _ = read_dataset(root / "JPEGImages", root / "Annotations")
    assert sum(a["iscrowd"] for a in loaded["annotations"]) == len(difficult)
    dataset = CocoDetection(root / "JPEGImages", root / "Annotations", dataset=loaded)
    assert sum(len(dataset.targets(i)[1]) for i in dataset.image_ids) == \
        len(original["annotations"]) - len(difficult)
    # Scored against the set without them: detections away from them score the same, and
    # detections on them change nothing (against the set without them they are false positives).
    without = {**original, "annotations": [a for a in original["annotations"] if a["id"] not in difficult]}
    files = {i["id"]: i["file_name"] for i in original["images"]}
    on_difficult = [(files[a["image_id"]], names(original)[a["category_id"]], a["bbox"], 0.99)
                    for a in original["annotations"] if a["id"] in difficult]
    detections = [d for d in fixed_detections(without)
                  if not any(f == d[0] and overlap(b, d[2]) for f, _, b, _ in on_difficult)]
    expected = evaluate(without, detections)["metrics"]
    assert evaluate(loaded, detections)["metrics"]["AP"] == expected["AP"]
    assert evaluate(loaded, detections + on_difficult)["metrics"]["AP"] == expected["AP"]
    assert evaluate(without, detections + on_difficult)["metrics"]["AP"] < expected["AP"]


# ------------------------------------------------------------------------------------------------
# Bad input: a DataError naming the file and line; the checker lists every one
# ------------------------------------------------------------------------------------------------
def tiny_voc(root: Path, objects: list[tuple], xml: str | None = None) -> Path:
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    cv2.imwrite(str(root / "JPEGImages" / "a.png"), np.zeros((20, 40, 3), np.uint8))
    (root / "Annotations" / "a.xml").write_text(xml or voc_xml("a.png", 40, 20, objects))
    return root


def tiny_yolo(root: Path, lines: list[str], names: str = "[cat, dog]") -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(root / "images" / "train" / "a.png"), np.zeros((20, 40, 3), np.uint8))
    (root / "labels" / "train" / "a.txt").write_text("".join(line + "\n" for line in lines))
    (root / "data.yaml").write_text(f"path: .\ntrain: images/train\nnames: {names}\n")
    return root


GOOD_OBJECT = ("<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax>"
               "</bndbox></object>")
BAD_INPUT = {
    # case: (format, file written, text or label lines, check, where: (file, line))
    "malformed_xml": ("voc", "<annotation>\n  <filename>a.png</filename>\n  <object>\n</annotation>\n",
                      "xml_malformed", ("Annotations/a.xml", 4)),
    "object_without_box": ("voc", f"<annotation>\n{GOOD_OBJECT}\n<object>\n  <name>cat</name>\n</object>\n"
                                  "</annotation>\n", "bad_voc_object", ("Annotations/a.xml", 3)),
    "non_numeric_corner": ("voc", f"<annotation>\n{GOOD_OBJECT}\n\n{GOOD_OBJECT.replace('>9<', '>nine<', 1)}"
                                  "\n</annotation>\n", "bad_voc_object", ("Annotations/a.xml", 4)),
    "unknown_class": ("voc", f"<annotation>\n{GOOD_OBJECT}\n{GOOD_OBJECT.replace('cat', 'cow')}\n"
                             "</annotation>\n",
                      "unknown_class", ("Annotations/a.xml", 3)),
    "wrong_field_count": ("yolo", ["0 0.5 0.5 0.2 0.2", "1 0.5 0.5 0.2"], "bad_label_line",
                          ("labels/train/a.txt", 2)),
    "non_numeric_field": ("yolo", ["0 0.5 0.5 0.2 0.2", "", "1 0.5 half 0.2 0.2"], "bad_label_line",
                          ("labels/train/a.txt", 3)),
    "class_out_of_range": ("yolo", ["2 0.5 0.5 0.2 0.2"], "class_out_of_range", ("labels/train/a.txt", 1)),
    "label_without_image": ("yolo", ["0 0.5 0.5 0.2 0.2"], "label_without_image",
                            ("labels/train/b.txt", None)),
}


def bad_dataset(tmp_path: Path, case: str) -> tuple[Path, Path, list | None, str, str]:
    """(images, annotations, classes, check, expected where) of a BAD_INPUT case."""
    form, content, check, (file, line) = BAD_INPUT[case]
    if form == "voc":
        root = tiny_voc(tmp_path, [], xml=content)
        images, annotations, classes = root / "JPEGImages", root / "Annotations", ["cat"]
    else:
        root = tiny_yolo(tmp_path, content)
        if case == "label_without_image":
            (root / "labels" / "train" / "b.txt").write_text(content[0] + "\n")
        images, annotations, classes = root / "images" / "train", root / "data.yaml", None
    return images, annotations, classes, check, str(root / file) + (f":{line}" if line else "")


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_names_the_file_and_line(tmp_path, case):
    images, annotations, classes, check, where = bad_dataset(tmp_path, case)
    with pytest.raises(DataError) as error:
        load_dataset(images, annotations, classes=classes)
    assert str(error.value).startswith(f"{where}: ") and "\n" not in str(error.value)
    report = check_dataset(images, annotations, classes=classes, read_images=False)
    issue = report.issue(check)
    assert issue.severity == "error" and issue.count == 1 and issue.first_ids[0].startswith(f"{where} (")
    assert f"(at {where} (" in str(issue) and not report.ok


def test_bad_input_stops_training_start_with_the_file_and_line(tmp_path):
    images, annotations, classes, _, where = bad_dataset(tmp_path, "wrong_field_count")
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                         [f"data.train.images={images}", f"data.train.annotations={annotations}"])
    for check in (True, False):
        with pytest.raises(DataError, match=re.escape(where)):
            build_dataset(config.data, train=True, check=check)


def test_box_outside_the_image_is_clipped_with_a_counted_warning(tmp_path):
    """The policy (retinanet.data.policy): a box partly outside its image is clipped, one without
    extent in the image dropped (counted), both repaired: training goes on."""
    root = tiny_yolo(tmp_path, ["0 0.9 0.5 0.4 0.5", "1 0.5 0.5 0.2 0.2", "1 1.5 0.5 0.2 0.2"])
    images, labels = root / "images" / "train", root / "labels" / "train" / "a.txt"
    report = check_dataset(images, root / "data.yaml", read_images=False)
    outside, empty = report.issue("box_outside_image"), report.issue("zero_size_box")
    assert outside.outcome == "repaired" and outside.first_ids == (f"{labels}:1",)
    assert empty.outcome == "repaired" and empty.first_ids == (f"{labels}:3",) and report.ok
    dataset = CocoDetection(images, root / "data.yaml", dataset=report.dataset)
    boxes, labels_ = dataset.targets(dataset.image_ids[0])
    np.testing.assert_allclose(boxes, [[28.0, 5.0, 40.0, 15.0], [16.0, 8.0, 24.0, 12.0]])
    assert labels_.tolist() == [0, 1] and dataset.report_dropped() == 1


@pytest.mark.parametrize("yaml_text, message", [
    ("train: images/train\n", "`names` must be"),
    ("names: {0: cat, 2: dog}\n", "`names` must be"),
    ("names: [cat, dog]\nnc: 3\n", "nc is 3"),
    ("names: [cat\n", "invalid YAML"),
])
def test_bad_data_yaml_names_the_file(tmp_path, yaml_text, message):
    root = tiny_yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    (root / "data.yaml").write_text(yaml_text)
    with pytest.raises(DataError, match=f"{root / 'data.yaml'}: .*{message}"):
        read_dataset(root / "images" / "train", root / "data.yaml")


def test_classes_must_fit_the_format(tmp_path, shapes):
    root = tiny_yolo(tmp_path, ["0 0.5 0.5 0.2 0.2"])
    with pytest.raises(ConfigError, match="differs from the names"):
        read_dataset(root / "images" / "train", root / "data.yaml", classes=["dog", "cat"])
    images_dir, _ = shapes
    annotations = images_dir.parent / "annotations" / "instances_train.json"
    with pytest.raises(ConfigError, match="a COCO json names its own categories"):
        load_dataset(images_dir, annotations, classes=["circle"])
    for override, message in (("data.classes=[a,a]", "data.classes"),
                              ("data.train.format=pascal", "not one of")):
        with pytest.raises(ConfigError, match=message):
            load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", [override])


# ------------------------------------------------------------------------------------------------
# Training start, the split, the converter
# ------------------------------------------------------------------------------------------------
def test_build_dataset_reads_each_format(shapes, tmp_path):
    images_dir, original = shapes
    voc = write_voc(original, images_dir, tmp_path / "VOC")
    yolo = write_yolo(original, images_dir, tmp_path / "yolo")
    for images, annotations, form in ((voc / "JPEGImages", voc / "ImageSets/Main/all.txt", "auto"),
                                      (yolo / "images/train", yolo / "data.yaml", "yolo")):
        config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                             [f"data.val.images={images}", f"data.val.annotations={annotations}",
                              f"data.val.format={form}"])
        for check in (True, False):
            dataset = build_dataset(config.data, train=False, check=check, log=lambda line: None)
            assert len(dataset) == len(original["images"])
            expected = sorted(names(original).values()) if form == "auto" else \
                [names(original)[c] for c in sorted(names(original))]  # voc: sorted; yolo: data.yaml
            assert dataset.class_names == expected
            assert dataset[0]["boxes"].shape[1] == 4


def test_val_fraction_split_is_deterministic_and_disjoint(shapes):
    _, original = shapes
    train, val = split_dataset(original, 0.25, seed=0)
    assert split_dataset(original, 0.25, seed=0) == (train, val)
    train_ids, val_ids = ({i["id"] for i in part["images"]} for part in (train, val))
    assert len(val_ids) == 2 and not train_ids & val_ids
    assert train_ids | val_ids == {i["id"] for i in original["images"]}
    for part, ids in ((train, train_ids), (val, val_ids)):
        assert {a["image_id"] for a in part["annotations"]} <= ids
        assert part["categories"] == original["categories"]
    assert len(train["annotations"]) + len(val["annotations"]) == len(original["annotations"])
    assert split_dataset(original, 0.25, seed=1)[1]["images"] != val["images"]
    shuffled = {**original, "images": original["images"][::-1]}  # the file order does not matter
    assert {i["id"] for i in split_dataset(shuffled, 0.25, seed=0)[1]["images"]} == val_ids


def run_convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)


def test_convert_tool_writes_coco_json_and_a_split(shapes, tmp_path):
    images_dir, original = shapes
    voc = write_voc(original, images_dir, tmp_path / "VOC")
    result = run_convert("--format", "voc", "--images", voc / "JPEGImages", "--annotations",
                         voc / "Annotations", "--output", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "out.json").read_text())
    expected = coco_json(read_dataset(voc / "JPEGImages", voc / "Annotations")[0])
    assert written == json.loads(json.dumps(expected))
    class_names = CocoDetection(voc / "JPEGImages", tmp_path / "out.json").class_names
    assert class_names == sorted(names(original).values())

    yolo = write_yolo(original, images_dir, tmp_path / "yolo")
    result = run_convert("--images", yolo / "images" / "train", "--annotations", yolo / "data.yaml",
                         "--output", tmp_path / "split", "--val-fraction", 0.25, "--seed", 0)
    assert result.returncode == 0, result.stderr
    assert "val.json: 2 images" in result.stdout
    # Another process, the same split: it depends on the files and the seed only.
    dataset = coco_json(read_dataset(yolo / "images" / "train", yolo / "data.yaml")[0])
    for name, part in zip(("train.json", "val.json"), split_dataset(dataset, 0.25, seed=0)):
        assert json.loads((tmp_path / "split" / name).read_text()) == json.loads(json.dumps(part))

    images, annotations, classes, _, where = bad_dataset(tmp_path / "bad", "class_out_of_range")
    result = run_convert("--images", images, "--annotations", annotations, "--output", tmp_path / "x.json")
    assert result.returncode == 2 and result.stderr.startswith(f"error: {where}: ")
    assert "Traceback" not in result.stderr and not (tmp_path / "x.json").exists()
    result = run_convert("--images", images, "--annotations", annotations, "--output", tmp_path / "x.json",
                         "--val-fraction", 0.2)
    assert result.returncode == 2 and "names the folder" in result.stderr


def test_analyze_anchors_takes_a_voc_dataset(shapes, tmp_path):
    images_dir, original = shapes
    voc = write_voc(original, images_dir, tmp_path / "VOC")
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "analyze_anchors.py"), "--config",
         str(REPO_ROOT / "configs" / "shapes_R18.yaml"), "--split", "val", "--format", "voc",
         f"data.val.images={voc / 'JPEGImages'}", f"data.val.annotations={voc / 'Annotations'}",
         "--json", str(tmp_path / "anchors.json")],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "anchors.json").read_text())
    assert report["num_images"] == len(original["images"])
    assert report["coverage"]["all"]["num_boxes"] == len(original["annotations"])
