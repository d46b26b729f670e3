"""retinanet.data.checks and tools/check_dataset.py on a hostile and on clean COCO datasets, and on
VOC / YOLO datasets read into COCO (their entries named by file and line)."""
from __future__ import annotations

import html
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from hostile import make_hostile_coco
from retinanet.data.checks import MAX_IDS, check_coco_dataset
from retinanet.data.policy import CHECKS, LABELS, POLICIES, consequence, outcome
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


# What training does with each problem of the hostile dataset: the decisions of
# retinanet/data/policy.py, pinned here so that changing one is a visible decision.
HOSTILE_OUTCOMES = {
    "duplicate_image_id": "stops", "duplicate_annotation_id": "stops", "orphan_annotation": "stops",
    "unknown_category": "stops", "image_missing": "stops", "image_unreadable": "stops",
    "image_size_mismatch": "stops", "non_finite_box": "repaired", "zero_size_box": "repaired",
    "box_outside_image": "repaired", "missing_info": "repaired", "missing_area": "repaired",
    "missing_iscrowd": "repaired", "image_without_annotations": "kept", "unused_category": "kept"}


def assert_reports(report, expected: dict) -> None:
    """`report` has exactly the checks of `expected` ({check: ids}), each with its count, first
    ids and a line saying what training does; its errors are what stops training."""
    assert {i.check for i in report.issues} == set(expected)
    for issue in report.issues:
        ids = expected[issue.check]
        assert (issue in report.errors) == (issue.outcome == "stops") != (issue in report.warnings)
        assert issue.count == max(1, len(ids)), issue.check
        assert list(issue.first_ids) == ids[:MAX_IDS], issue.check
        assert str(issue).startswith(f"{LABELS[issue.outcome]:<8} {issue.check}: ")
        assert str(issue).endswith(f" -- {consequence(issue.check, issue.skip_bad_images)}")


def test_hostile_dataset_reports_every_problem_with_counts_and_ids(hostile):
    report = check_coco_dataset(hostile["images"], hostile["annotations"])
    assert not report.ok
    assert_reports(report, {**hostile["errors"], **hostile["warnings"]})
    assert {i.check: i.outcome for i in report.issues} == HOSTILE_OUTCOMES
    assert (report.num_images, report.num_annotations, report.num_categories) == (9, 25, 3)
    zero_size = report.issue("zero_size_box")
    assert zero_size.count == 6 and len(zero_size.first_ids) == MAX_IDS  # only the first 5 ids
    text = report.format()
    assert ("REPAIRED zero_size_box: 6 annotation(s) with no extent in their image (zero or "
            "negative width/height, under 0.01 px, or wholly outside) (first ids: 2, 3, 15, 16, 17, "
            "...) -- training drops them and goes on") in text
    assert ("ERROR    image_missing: 1 image(s) whose file does not exist (first ids: 2) -- training "
            "stops unless data.skip_bad_images is true (then it skips them): add the files") in text
    assert len(text.splitlines()) == 1 + len(report.issues) + 1
    # with data.skip_bad_images the image problems are skipped; the rest stays as it was
    skipping = report.with_skip_bad_images(True)
    assert_reports(skipping, {**hostile["errors"], **hostile["warnings"]})
    assert {i.check for i in skipping.issues if i.outcome == "skipped"} == \
        {"image_missing", "image_unreadable", "image_size_mismatch"}
    assert ("SKIPPED  image_missing: 1 image(s) whose file does not exist (first ids: 2) -- training "
            "skips them (data.skip_bad_images is true); add the files") in skipping.format()
    assert len(skipping.errors) == len(report.errors) - 3 and not skipping.ok


def test_no_read_only_checks_that_files_exist(hostile):
    report = check_coco_dataset(hostile["images"], hostile["annotations"], read_images=False)
    expected = {k: v for k, v in {**hostile["errors"], **hostile["warnings"]}.items()
                if k not in hostile["read_only_checks"]}
    assert_reports(report, expected)
    assert "only checked to exist" in report.format()


@pytest.mark.parametrize("split", ["train", "val"])
def test_clean_shapes_dataset_has_no_errors(clean, split):
    report = check_coco_dataset(clean / split, clean / "annotations" / f"instances_{split}.json")
    assert report.ok and report.errors == []
    if split == "train":
        assert report.warnings == []
    else:  # the 2 val images happen to show no circle (id 1) and no triangle (id 3)
        assert [(w.check, w.first_ids) for w in report.warnings] == [("unused_category", (1, 3))]
    assert report.format().splitlines()[-1] == \
        f"OK: nothing stops training (0 repaired, 0 skipped, {len(report.warnings)} note(s))"


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
    assert "OK: nothing stops training" in result.stdout

    result = run_tool("--images", hostile["images"], "--annotations", hostile["annotations"])
    assert result.returncode == 1, result.stderr
    assert "ERROR    duplicate_image_id: 1 image id(s)" in result.stdout
    assert "(first ids: 3, 4, 5)" in result.stdout  # unreadable images
    assert ("REPAIRED box_outside_image: 1 box(es) extending outside their image (first ids: 11) "
            "-- training clips them to the image and goes on") in result.stdout
    assert ("FAILED: 7 problem(s) stop training (6 repaired, 0 skipped, 2 note(s)); fix them before "
            "training; or skip the images of image_missing, image_unreadable, image_size_mismatch "
            "with data.skip_bad_images=true (--skip-bad-images)") in result.stdout

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
    outside its image or thinner than 0.01 px is dropped, a box partly outside clipped."""
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
    assert result.returncode == 0 and "OK: nothing stops training" in result.stdout, result.stderr
    result = run_tool("--images", voc, "--annotations", voc, "--format", "voc", "--classes", "dog")
    assert result.returncode == 1
    assert f"ERROR    unknown_class: 1 VOC object(s) whose name is not in data.classes (at {voc / 'a.xml'}:1 " \
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
    assert "FAILED: 1 problem(s) stop training" in result.stdout


# ------------------------------------------------------------------------------------------------
# One policy (retinanet/data/policy.py): the checker, the training start and the docs agree
# ------------------------------------------------------------------------------------------------
def tiny_coco(root: Path, case: str) -> tuple[Path, Path]:
    """Two 40 x 30 images with one box each, and one problem of the `case` policy:
    stops: a duplicate annotation id; skippable: a missing image file; repaired: a zero-size box,
    and no 'area' / 'iscrowd' / 'info'; kept: an image without annotations. -> (images, json)."""
    root.mkdir(parents=True, exist_ok=True)
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 30} for i in (1, 2)]
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 10 * i, 8], "area": 80.0 * i,
             "iscrowd": 0} for i in (1, 2)]
    data = {"info": {}, "images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    for image in images:
        cv2.imwrite(str(root / image["file_name"]), np.full((30, 40, 3), 90, np.uint8))
    if case == "stops":
        anns[1]["id"] = 1
    elif case == "skippable":
        (root / "2.png").unlink()
    elif case == "repaired":
        anns.append({"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 0, 4]})
        for ann in anns:
            ann.pop("area", None), ann.pop("iscrowd", None)
        del data["info"]
    elif case == "kept":
        images.append({"id": 3, "file_name": "1.png", "width": 40, "height": 30})
    (root / "ann.json").write_text(json.dumps(data))
    return root, root / "ann.json"


# per case: the check, what the checker and training do, and with data.skip_bad_images
CASES = {"stops": ("duplicate_annotation_id", "stops", "stops"),
         "skippable": ("image_missing", "stops", "skipped"),
         "repaired": ("zero_size_box", "repaired", "repaired"),
         "kept": ("image_without_annotations", "kept", "kept")}


def test_every_check_has_a_policy_and_words():
    assert set(POLICIES) == {"stops", "skippable", "repaired", "kept"}
    for check, (policy, found, text) in CHECKS.items():
        assert policy in POLICIES and found and text, check
        assert (outcome(check, False) == "stops") == (policy in ("stops", "skippable")), check
        assert (outcome(check, True) == "stops") == (policy == "stops"), check


@pytest.mark.parametrize("case", list(CASES))
def test_checker_verdict_follows_the_policy(tmp_path, case):
    from retinanet.data.formats import check_dataset
    check, plain, skipping = CASES[case]
    report = check_dataset(*tiny_coco(tmp_path, case))
    for skip, expected in ((False, plain), (True, skipping)):
        judged = report.with_skip_bad_images(skip)
        assert judged.ok == (expected != "stops") and judged.issue(check).outcome == expected
        line = next(line for line in judged.format().splitlines() if f" {check}: " in line)
        assert line.startswith(LABELS[expected]) and line.endswith(consequence(check, skip))
        assert judged.format().splitlines()[-1].startswith("OK" if judged.ok else "FAILED")


def test_tool_judges_with_the_skip_bad_images_setting(tmp_path):
    images, annotations = tiny_coco(tmp_path, "skippable")
    result = run_tool("--images", images, "--annotations", annotations)
    assert result.returncode == 1 and "ERROR    image_missing: 1 image(s)" in result.stdout
    result = run_tool("--images", images, "--annotations", annotations, "--skip-bad-images")
    assert result.returncode == 0 and "SKIPPED  image_missing: 1 image(s)" in result.stdout
    assert result.stdout.splitlines()[-1] == "OK: nothing stops training (0 repaired, 1 skipped, 0 note(s))"


def _start(images: Path, annotations: Path, *overrides: str):
    """build_dataset of the training split as Trainer does it (check=True) -> (dataset, log lines)."""
    from retinanet.config import load_config
    from retinanet.data import build_dataset
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                         [f"data.train.images={images}", f"data.train.annotations={annotations}",
                          *overrides])
    logs: list[str] = []
    return build_dataset(config.data, train=True, check=True, log=logs.append), logs


@pytest.mark.parametrize("skip", [False, True])
def test_training_start_stops_on_a_stopping_check_and_names_it(tmp_path, skip):
    from retinanet.errors import DataError
    for case in ("stops", "skippable"):
        images, annotations = tiny_coco(tmp_path / case, case)
        if case == "skippable" and skip:
            continue  # skipped, see below
        with pytest.raises(DataError) as error:
            _start(images, annotations, f"data.skip_bad_images={str(skip).lower()}")
        message = str(error.value)
        assert f"ERROR    {CASES[case][0]}: " in message and "tools/check_dataset.py" in message
        assert ("--skip-bad-images" in message) == skip  # the checker's command judges the same


def test_training_start_skips_repairs_and_keeps_with_counted_lines(tmp_path):
    dataset, logs = _start(*tiny_coco(tmp_path / "skippable", "skippable"), "data.skip_bad_images=true")
    assert any(line.startswith("data.train: SKIPPED  image_missing: 1 image(s)") for line in logs)
    assert dataset.image_ids == [1]  # the missing file is left out

    dataset, logs = _start(*tiny_coco(tmp_path / "repaired", "repaired"))
    assert "data.train: REPAIRED zero_size_box: 1 annotation(s) with no extent in their image " \
           "(zero or negative width/height, under 0.01 px, or wholly outside) (first ids: 3) -- " \
           "training drops them and goes on" in logs
    assert any(line.startswith("data.train: REPAIRED missing_area: 3 annotation(s)") for line in logs)
    assert dataset.report_dropped() == 1 and len(dataset.targets(2)[0]) == 1
    anns = dataset.coco.dataset["annotations"]  # filled in as the lines say
    assert [(a["area"], a["iscrowd"]) for a in anns] == [(80.0, 0), (160.0, 0)]
    assert 3 not in dataset.coco.anns  # dropped from the evaluation's ground truth too
    assert dataset.coco.dataset["info"] == {}

    dataset, logs = _start(*tiny_coco(tmp_path / "kept", "kept"))
    assert any(line.startswith("data.train: NOTE     image_without_annotations: 1 image(s)")
               for line in logs)
    assert dataset.image_ids == [1, 2, 3] and len(dataset.targets(3)[0]) == 0


def test_repaired_fields_let_a_val_split_evaluate(tmp_path):
    """pycocotools' evaluation stops on a KeyError without 'area' or 'iscrowd': filled in, the
    split evaluates (here built as tools/eval.py builds it, without the checks)."""
    from retinanet.config import load_config
    from retinanet.data import build_dataset
    from retinanet.engine.evaluator import coco_evaluate
    images, annotations = tiny_coco(tmp_path, "repaired")
    data = json.loads(annotations.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["id"] != 3]  # the zero-size box
    annotations.write_text(json.dumps(data))
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                         [f"data.val.images={images}", f"data.val.annotations={annotations}"])
    dataset = build_dataset(config.data, train=False)
    results = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
               for a in data["annotations"]]
    assert coco_evaluate(dataset.coco, results)["metrics"]["AP"] == pytest.approx(1.0)


# The table of docs/your-data.md, between these markers, is this rendering of the policy.
TABLE_BEGIN = "<!-- bad-input-table:begin (generated from retinanet/data/policy.py; tests/test_check_dataset.py compares) -->"
TABLE_END = "<!-- bad-input-table:end -->"


def bad_input_table() -> str:
    """The policy as a markdown table: per check, what the checker prints and what training does
    (in the words of the checker's lines, for data.skip_bad_images: false)."""
    says = {"stops": "ERROR", "skippable": "ERROR (SKIPPED with `--skip-bad-images`)",
            "repaired": "REPAIRED", "kept": "NOTE"}
    rows = ["| check | problem | checker says | training |", "|---|---|---|---|"]
    rows += [f"| `{check}` | {html.escape(found, quote=False)} | {says[policy]} | "
             f"{html.escape(consequence(check), quote=False)} |"
             for check, (policy, found, _) in CHECKS.items()]
    return "\n".join(rows)


def test_docs_table_is_the_policy():
    page = (REPO_ROOT / "docs" / "your-data.md").read_text(encoding="utf-8")
    assert TABLE_BEGIN in page and TABLE_END in page
    table = page.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == bad_input_table(), \
        "docs/your-data.md's bad-input table is stale; replace it with:\n" + bad_input_table()
