"""retinanet.data.checks and tools/check_dataset.py on a hostile and on clean COCO datasets, and on
VOC / YOLO datasets read into COCO (their entries named by file and line)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hostile import make_hostile_coco
from retinanet.data.checks import CHECKS, MAX_IDS, check_coco_dataset
from retinanet.data.shapes import generate_shapes_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOL = REPO_ROOT / "tools" / "check_dataset.py"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    return make_hostile_coco(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    generate_shapes_dataset(out, num_train=4, num_val=2, image_size=64, seed=0)
    return out


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT)


def assert_reports(report, expected: dict, severity: str) -> None:
    found = {i.check: i for i in (report.errors if severity == "error" else report.warnings)}
    assert set(found) == set(expected)
    for check, ids in expected.items():
        issue = found[check]
        assert issue.severity == severity == CHECKS[check][0]
        assert issue.count == max(1, len(ids)), check
        assert list(issue.first_ids) == ids[:MAX_IDS], check
        assert str(issue).startswith(f"{'ERROR' if severity == 'error' else 'WARN'}")
        assert f"{check}: " in str(issue) and " -- " in str(issue)


def test_hostile_dataset_reports_every_problem_with_counts_and_ids(hostile):
    report = check_coco_dataset(hostile["images"], hostile["annotations"])
    assert not report.ok
    assert_reports(report, hostile["errors"], "error")
    assert_reports(report, hostile["warnings"], "warning")
    assert (report.num_images, report.num_annotations, report.num_categories) == (9, 25, 3)
    zero_size = report.issue("zero_size_box")
    assert zero_size.count == 6 and len(zero_size.first_ids) == MAX_IDS  # only the first 5 ids
    text = report.format()
    assert ("ERROR  zero_size_box: 6 annotation(s) with no extent in their image (zero or negative "
            "width/height, under 0.01 px, or wholly outside) (first ids: 2, 3, 15, 16, 17, ...) "
            "-- they are dropped in training") in text
    assert len(text.splitlines()) == 1 + len(report.errors) + len(report.warnings) + 1


def test_no_read_only_checks_that_files_exist(hostile):
    report = check_coco_dataset(hostile["images"], hostile["annotations"], read_images=False)
    expected = {k: v for k, v in hostile["errors"].items() if k not in hostile["read_only_checks"]}
    assert_reports(report, expected, "error")
    assert_reports(report, hostile["warnings"], "warning")
    assert "only checked to exist" in report.format()


@pytest.mark.parametrize("split", ["train", "val"])
def test_clean_shapes_dataset_has_no_errors(clean, split):
    report = check_coco_dataset(clean / split, clean / "annotations" / f"instances_{split}.json")
    assert report.ok and report.errors == []
    if split == "train":
        assert report.warnings == []
    else:  # the 2 val images happen to show no circle (id 1) and no triangle (id 3)
        assert [(w.check, w.first_ids) for w in report.warnings] == [("unused_category", (1, 3))]
    assert report.format().splitlines()[-1] == f"OK: no errors, {len(report.warnings)} warning(s)"


def test_boxes_on_the_edge_within_round_off_are_inside(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # existence only: read_images=False
    data = {"info": {}, "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10.005, 10],
                             "area": 100.0, "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [-0.5, 0, 5, 5],
                             "area": 25.0, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    report = check_coco_dataset(tmp_path, tmp_path / "a.json", read_images=False)
    assert report.ok
    assert [(w.check, w.first_ids) for w in report.warnings] == [("box_outside_image", (2,))]


@pytest.mark.parametrize("content, check, detail", [
    (None, "annotation_file_missing", "a.json"),
    ("{not json", "annotation_file_not_json", "a.json"),
    ("[1, 2]", "not_coco_instances", "holds a list"),
    (json.dumps({"images": [], "annotations": {}}), "not_coco_instances", "annotations, categories"),
])
def test_unusable_annotation_file_is_one_error(tmp_path, content, check, detail):
    if content is not None:
        (tmp_path / "a.json").write_text(content)
    report = check_coco_dataset(tmp_path, tmp_path / "a.json")
    assert [e.check for e in report.errors] == [check] and report.warnings == []
    assert report.errors[0].count == 1 and detail in report.errors[0].message


def test_malformed_entries_do_not_crash_the_checker(tmp_path):
    data = {"info": {}, "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}],
            "images": [{"id": 1, "file_name": "a.png"}, "not a dict", {"id": [2], "file_name": "b.png",
                                                                       "width": 5, "height": 5}],
            "annotations": [{"id": 1, "image_id": [1], "category_id": {}, "bbox": [0, 0, 1, 1]},
                            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1,
                             "iscrowd": 0}, 7]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    report = check_coco_dataset(tmp_path, tmp_path / "a.json")
    ids = {e.check: e.first_ids for e in report.errors}
    assert ids["duplicate_category_id"] == (1,)
    assert ids["bad_image_entry"] == (1, "#1", "#2")
    assert ids["bad_annotation_entry"] == ("#1", "#2")
    assert ids["orphan_annotation"] == (1,) and ids["unknown_category"] == (1,)


def test_missing_image_folder_is_one_error(tmp_path, hostile):
    report = check_coco_dataset(tmp_path / "nowhere", hostile["annotations"])
    assert report.issue("images_dir_missing") is not None
    assert report.issue("image_missing") is None  # not one error per image


def test_tool_exit_codes_and_output(hostile, clean):
    result = run_tool("--images", clean / "train", "--annotations",
                      clean / "annotations" / "instances_train.json")
    assert result.returncode == 0, result.stderr
    assert "OK: no errors" in result.stdout

    result = run_tool("--images", hostile["images"], "--annotations", hostile["annotations"])
    assert result.returncode == 1, result.stderr
    assert "ERROR  duplicate_image_id: 1 image id(s)" in result.stdout
    assert "(first ids: 3, 4, 5)" in result.stdout  # unreadable images
    assert ("WARN   box_outside_image: 1 box(es) extending outside their image (first ids: 11)"
            in result.stdout)
    assert "FAILED: 9 error(s), 6 warning(s)" in result.stdout

    result = run_tool("--images", hostile["images"], "--annotations", hostile["annotations"],
                      "--no-read")
    assert result.returncode == 1 and "image_unreadable" not in result.stdout


def test_tool_usage_errors_are_one_line_exit_2(hostile, tmp_path):
    missing = tmp_path / "missing.json"
    result = run_tool("--images", hostile["images"], "--annotations", missing)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: annotation file not found: {missing} (check --annotations)"
    result = run_tool("--images", tmp_path / "nowhere", "--annotations", hostile["annotations"])
    assert result.returncode == 2 and "image folder not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_tool("--images", hostile["images"]).returncode == 2  # argparse: --annotations missing


def test_checker_flags_exactly_the_boxes_training_drops(clean, tmp_path):
    """The checker and the loader share one rule (retinanet.data.coco.clipped_box): a box wholly
    outside its image or thinner than 0.01 px is an error, a box partly outside only a warning."""
    from retinanet.data import CocoDetection
    data = json.loads((clean / "annotations" / "instances_train.json").read_text())
    image = data["images"][0]
    w, h = image["width"], image["height"]
    extra = {9001: [w + 5, 2, 4, 4], 9002: [3, 3, 0.005, 5], 9003: [w - 2, 2, 6, 4]}
    for ann_id, bbox in extra.items():
        data["annotations"].append({"id": ann_id, "image_id": image["id"], "category_id":
                                    data["categories"][0]["id"], "bbox": bbox, "area": 1.0, "iscrowd": 0})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    report = check_coco_dataset(clean / "train", path)
    assert list(report.issue("zero_size_box").first_ids) == [9001, 9002]
    assert list(report.issue("box_outside_image").first_ids) == [9003]
    dataset = CocoDetection(clean / "train", path)
    assert dataset.report_dropped() == 2


def test_an_in_memory_dict_is_checked_as_its_file(clean):
    path = clean / "annotations" / "instances_val.json"
    from_file = check_coco_dataset(clean / "val", path)
    in_memory = check_coco_dataset(clean / "val", path, dataset=json.loads(path.read_text()))
    assert in_memory.errors == from_file.errors and in_memory.warnings == from_file.warnings
    assert in_memory.num_annotations == from_file.num_annotations
    assert check_coco_dataset(clean / "val", path, dataset=[]).issue("not_coco_instances") is not None


def test_entries_with_a_source_are_named_by_file_and_line(tmp_path):
    """VOC / YOLO readers give each entry the file (and line) it came from; the report names
    those instead of ids, and lists the readers' own problems with them."""
    (tmp_path / "a.png").write_bytes(b"")
    data = {"info": {}, "categories": [{"id": 1, "name": "a"}],
            "images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10, "source": "a.png"},
                       {"id": 2, "file_name": "b.png", "width": 10, "height": 10, "source": "b.xml"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [8, 0, 5, 5],
                             "area": 25, "iscrowd": 0, "source": "a.txt:2"}]}
    problems = [("bad_label_line", "a.txt:1", "4 fields"), ("bad_label_line", "a.txt:3", "not numbers")]
    report = check_coco_dataset(tmp_path, tmp_path / "labels", read_images=False, dataset=data,
                                problems=problems)
    assert report.issue("bad_label_line").first_ids == ("a.txt:1 (4 fields)", "a.txt:3 (not numbers)")
    assert "2 label line(s) that are not 5 numbers 'class cx cy w h' (at a.txt:1 (4 fields), " \
           "a.txt:3 (not numbers)) -- " in str(report.issue("bad_label_line"))
    assert report.issue("image_missing").first_ids == ("b.xml",)
    assert report.issue("image_without_annotations").first_ids == ("b.xml",)
    assert "(at a.txt:2)" in str(report.issue("box_outside_image"))


def test_tool_takes_voc_and_yolo(tmp_path):
    voc = tmp_path / "voc"
    voc.mkdir()
    cv2.imwrite(str(voc / "a.png"), np.zeros((20, 40, 3), np.uint8))
    (voc / "a.xml").write_text("<annotation><object><name>cat</name><bndbox><xmin>1</xmin>"
                               "<ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object></annotation>")
    result = run_tool("--images", voc, "--annotations", voc)
    assert result.returncode == 0 and "OK: no errors" in result.stdout, result.stderr
    result = run_tool("--images", voc, "--annotations", voc, "--format", "voc", "--classes", "dog")
    assert result.returncode == 1
    assert f"ERROR  unknown_class: 1 VOC object(s) whose name is not in data.classes (at {voc / 'a.xml'}:1 " \
           in result.stdout

    yolo = tmp_path / "yolo"
    (yolo / "images" / "train").mkdir(parents=True)
    (yolo / "labels" / "train").mkdir(parents=True)
    cv2.imwrite(str(yolo / "images" / "train" / "a.png"), np.zeros((20, 40, 3), np.uint8))
    (yolo / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5\n")
    (yolo / "data.yaml").write_text("names: [cat]\n")
    result = run_tool("--images", yolo / "images" / "train", "--annotations", yolo / "data.yaml")
    assert result.returncode == 1
    assert f"(at {yolo / 'labels' / 'train' / 'a.txt'}:2 (3 fields, need 5" in result.stdout
    assert "FAILED: 1 error(s)" in result.stdout
