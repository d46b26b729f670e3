"""Checks a COCO instances dataset before training: `check_coco_dataset(images_dir, annotations)`.
VOC and YOLO datasets are checked as the COCO dict they are read into (retinanet.data.formats),
their readers' problems and the entries they made named by file and line.

The raw json is read with plain `json`, not pycocotools: `COCO()` crashes on some of these errors
and silently merges others (duplicate ids overwrite each other in its index dicts). Each problem
is reported once, with how often it occurs and the first few offending ids, as an error (training
or evaluation would crash, or silently learn from something else than the file says) or a warning
(the pipeline copes, but you may not want it to).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable

import cv2

from .coco import clipped_box

MAX_IDS = 5  # offending ids listed per problem
# COCO json rounds coordinates to 2 decimals, so x + w may pass the image edge by round-off.
EDGE_TOLERANCE = 0.01

# check name -> (severity, what was found, consequence and what to do). The order is the order
# of the report.
CHECKS: dict[str, tuple[str, str, str]] = {
    "annotation_file_missing": ("error", "annotation file not found", "check the path (--annotations)"),
    "annotation_file_not_json": ("error", "annotation file is not valid JSON",
                                 "nothing can be loaded; fix or regenerate the file"),
    "not_coco_instances": ("error", "not a COCO instances json: missing or non-list key(s)",
                           "the top level needs 'images', 'annotations' and 'categories' lists"),
    # Problems of the VOC and YOLO readers (retinanet.data.voc, retinanet.data.yolo): training stops.
    "xml_malformed": ("error", "annotation file(s) that are not well-formed XML", "fix or regenerate them"),
    "listed_file_missing": ("error", "image set line(s) naming an id without an XML file",
                            "add the file or remove the line"),
    "bad_voc_object": ("error", "VOC object(s) without a <name> or 4 numeric <bndbox> corners", "fix them"),
    "unknown_class": ("error", "VOC object(s) whose name is not in data.classes",
                      "add the name to data.classes (--classes) or fix it"),
    "bad_label_line": ("error", "label line(s) that are not 5 numbers 'class cx cy w h'", "fix the lines"),
    "class_out_of_range": ("error", "label line(s) whose class index has no name",
                           "fix the index or add the name to data.yaml"),
    "label_without_image": ("error", "label file(s) without an image of the same name",
                            "their boxes would be lost; add the image or remove the file"),
    "images_dir_missing": ("error", "image folder not found",
                           "check the path (--images); image files were not checked"),
    "bad_image_entry": ("error", "image entry(ies) without an int/str 'id', a 'file_name' or a "
                                 "positive 'width'/'height'",
                        "the loader needs all four; fix the 'images' list"),
    "duplicate_image_id": ("error", "image id(s) used by more than one image entry",
                           "pycocotools keeps the last entry and gives it the annotations of all; "
                           "give every image its own id"),
    "image_missing": ("error", "image(s) whose file does not exist",
                      "training stops when it reaches them; add the files or remove the entries"),
    "image_unreadable": ("error", "image file(s) that cv2 cannot read or that are truncated",
                         "training stops on them or learns from a half-grey image; "
                         "re-export or remove them"),
    "image_size_mismatch": ("error", "image(s) whose real size differs from the json width/height",
                            "boxes are clipped to the json size and may be in another resolution "
                            "than the file (a resized copy?); fix width/height or the file"),
    "bad_annotation_entry": ("error", "annotation(s) without an int/str 'id', an 'image_id' or a "
                                      "'category_id'",
                             "the loader needs all three; fix the 'annotations' list"),
    "duplicate_annotation_id": ("error", "annotation id(s) used by more than one annotation",
                                "pycocotools indexes by id, so evaluation sees the last one twice; "
                                "give every annotation its own id"),
    "orphan_annotation": ("error", "annotation(s) referring to an image id that does not exist",
                          "they are silently ignored; fix image_id or remove them"),
    "unknown_category": ("error", "annotation(s) whose category_id is not in 'categories'",
                         "the loader stops on them; add the category or fix category_id"),
    "duplicate_category_id": ("error", "category id(s) used by more than one category",
                              "pycocotools keeps only the last one; give every category its own id"),
    "non_finite_box": ("error", "annotation(s) whose bbox is missing, not 4 numbers, NaN or inf",
                       "the loader crashes on them or drops them; fix or remove them"),
    "zero_size_box": ("error", "annotation(s) with no extent in their image (zero or negative "
                               "width/height, under 0.01 px, or wholly outside)",
                      "they are dropped in training; fix or remove them"),
    "box_outside_image": ("warning", "box(es) extending outside their image",
                          "they are clipped to the image in training"),
    "missing_info": ("warning", "the json has no 'info' field",
                     "some pycocotools versions (2.0.7) fail to evaluate without it; "
                     "add \"info\": {}"),
    "missing_area": ("warning", "annotation(s) without 'area'",
                     "pycocotools evaluation fails without it (small/medium/large split); "
                     "add w * h"),
    "missing_iscrowd": ("warning", "annotation(s) without 'iscrowd'",
                        "pycocotools evaluation fails without it; add \"iscrowd\": 0"),
    "image_without_annotations": ("warning", "image(s) without annotations",
                                  "they are kept as negatives (all background)"),
    "unused_category": ("warning", "category(ies) with no annotation",
                        "the model still gets an output for them; remove them if unintended"),
}


class Where(str):
    """A place in a source file ("labels/a.txt:3"), named by the report instead of an id."""


@dataclass(frozen=True)
class Issue:
    """One kind of problem: `count` occurrences, the first `MAX_IDS` offending ids (image,
    annotation or category ids as the check says; `#k` for an entry at list index k that has no
    usable id) and a one-line human message."""
    check: str
    severity: str  # "error" | "warning"
    count: int
    first_ids: tuple
    message: str

    def __str__(self) -> str:
        level = "ERROR" if self.severity == "error" else "WARN"
        return f"{level:<6} {self.check}: {self.message}"


@dataclass
class DatasetReport:
    """Result of `check_coco_dataset`: `errors` and `warnings` are lists of `Issue`."""
    images_dir: Path
    annotations: Path
    read_images: bool
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    # The parsed json (None when it could not be read): training builds its dataset from it
    # instead of parsing the file a second time.
    dataset: dict | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings do not count)."""
        return not self.errors

    def issue(self, check: str) -> Issue | None:
        """The issue reported by `check` (a key of CHECKS), or None when that check passed."""
        return next((i for i in self.errors + self.warnings if i.check == check), None)

    def format(self) -> str:
        """Readable report: a header, one line per problem, a verdict line."""
        files = "image files read" if self.read_images else "image files only checked to exist"
        lines = [f"{self.annotations} (images in {self.images_dir}): {self.num_images} images, "
                 f"{self.num_annotations} annotations, {self.num_categories} categories; {files}"]
        lines += [str(i) for i in self.errors + self.warnings]
        if self.ok:
            lines.append(f"OK: no errors, {len(self.warnings)} warning(s)")
        else:
            lines.append(f"FAILED: {len(self.errors)} error(s), {len(self.warnings)} warning(s); "
                         "fix the errors before training")
        return "\n".join(lines)


class _Findings:
    """Collects offending ids per check, then turns them into Issues in CHECKS order."""

    def __init__(self) -> None:
        self.ids: dict[str, list] = {}
        self.details: dict[str, str] = {}

    def add(self, check: str, ids: Iterable = (None,), detail: str | None = None) -> None:
        self.ids.setdefault(check, []).extend(ids)
        if detail is not None:
            self.details[check] = detail

    def issues(self) -> tuple[list[Issue], list[Issue]]:
        errors, warnings = [], []
        for check, (severity, found, advice) in CHECKS.items():
            if check not in self.ids:
                continue
            ids = [i for i in self.ids[check] if i is not None]
            count = len(self.ids[check])
            first = tuple(ids[:MAX_IDS])
            message = f"{count} {found}" if ids else found
            if check in self.details:
                message += f": {self.details[check]}"
            if first:
                more = ", ..." if len(ids) > MAX_IDS else ""
                label = "at" if all(isinstance(i, Where) for i in first) else "first ids:"
                message += f" ({label} {', '.join(str(i) for i in first)}{more})"
            issue = Issue(check, severity, count, first, f"{message} -- {advice}")
            (errors if severity == "error" else warnings).append(issue)
        return errors, warnings


def check_coco_dataset(images_dir: str | os.PathLike, annotations: str | os.PathLike, *,
                       read_images: bool = True, dataset: dict | None = None,
                       problems: Iterable[tuple[str, str, str]] = ()) -> DatasetReport:
    """Checks a COCO instances json and its image folder; never raises on bad data.

    read_images: decode every image with cv2 (as training does) to find unreadable or truncated
    files and sizes that disagree with the json; False only checks that the files exist (reading
    all of COCO train2017 takes minutes).
    dataset: the COCO dict already in memory (a VOC or YOLO dataset read by retinanet.data.formats)
    instead of the json file `annotations`; entries with a "source" are named by it, not their id.
    problems: (check, where, detail) found while reading it, reported with the rest.
    """
    report = DatasetReport(Path(images_dir), Path(annotations), read_images)
    findings = _Findings()
    for check, where, detail in problems:
        findings.add(check, [Where(f"{where} ({detail})" if detail else where)])
    data = report.dataset = _load_json(report.annotations, findings) if dataset is None else \
        _coco_lists(dataset, report.annotations, findings)
    if data is not None:
        images, anns, cats = data["images"], data["annotations"], data["categories"]
        report.num_images, report.num_annotations = len(images), len(anns)
        report.num_categories = len(cats)
        if "info" not in data:
            findings.add("missing_info")
        cat_ids = _check_categories(cats, findings)
        image_sizes, image_refs = _check_images(images, report.images_dir, read_images, findings)
        _check_annotations(anns, image_sizes, image_refs, cat_ids, findings)
    report.errors, report.warnings = findings.issues()
    return report


def _load_json(path: Path, findings: _Findings) -> dict | None:
    """The parsed json when it is a COCO instances file, else None (with the reason recorded)."""
    if not path.is_file():
        findings.add("annotation_file_missing", detail=str(path))
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)  # accepts NaN / Infinity literals, which we then report
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        findings.add("annotation_file_not_json", detail=f"{path} ({error})")
        return None
    return _coco_lists(data, path, findings)


def _coco_lists(data: Any, path: Path, findings: _Findings) -> dict | None:
    """`data` when it has the lists of a COCO instances file, else None (with the reason recorded)."""
    if not isinstance(data, dict):
        findings.add("not_coco_instances", detail=f"{path} holds a {type(data).__name__}, not an object")
        return None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        findings.add("not_coco_instances", detail=f"{path}: {', '.join(missing)}")
        return None
    return data


def _entry_id(entry: Any) -> Hashable | None:
    """The entry's id when it is usable (int or str, COCO uses ints), else None."""
    if not isinstance(entry, dict):
        return None
    value = entry.get("id")
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def _ref(entry: Any, fallback: Hashable) -> Hashable:
    """How the report names an entry: its "source" (file and line of a VOC / YOLO dataset) or `fallback`."""
    source = entry.get("source") if isinstance(entry, dict) else None
    return Where(source) if isinstance(source, str) else fallback


def _duplicates(ids: list) -> list:
    """Ids occurring more than once, each listed once, in order of first appearance."""
    counts = Counter(ids)
    return [i for i in dict.fromkeys(ids) if counts[i] > 1]


def _check_categories(cats: list, findings: _Findings) -> dict:
    """-> {category id: number of annotations} (filled by _check_annotations)."""
    ids = [i for i in map(_entry_id, cats) if i is not None]
    if dups := _duplicates(ids):
        findings.add("duplicate_category_id", dups)
    return dict.fromkeys(ids, 0)


def _check_images(images: list, images_dir: Path, read_images: bool,
                  findings: _Findings) -> tuple[dict[Hashable, tuple[float, float]], dict]:
    """-> ({image id: (width, height) from the json}, {image id: how the report names it});
    records image-level problems."""
    sizes: dict[Hashable, tuple[float, float]] = {}
    refs: dict = {}
    seen: list = []
    dir_ok = images_dir.is_dir()
    if not dir_ok:
        findings.add("images_dir_missing", detail=str(images_dir))
    for index, image in enumerate(images):
        image_id = _entry_id(image)
        ref = refs[image_id] = _ref(image, image_id if image_id is not None else f"#{index}")
        if image_id is None or not _positive_size(image) or not isinstance(image.get("file_name"), str):
            findings.add("bad_image_entry", [ref])
            if image_id is not None:
                seen.append(image_id)
                sizes.setdefault(image_id, (math.inf, math.inf))  # annotations still find it
            continue
        seen.append(image_id)
        sizes[image_id] = (float(image["width"]), float(image["height"]))
        if not dir_ok:
            continue
        path = images_dir / image["file_name"]
        if not path.is_file():
            findings.add("image_missing", [ref])
        elif read_images:
            _check_image_file(path, ref, sizes[image_id], findings)
    if dups := _duplicates(seen):
        findings.add("duplicate_image_id", dups)
    return sizes, refs


def _positive_size(image: dict) -> bool:
    return all(_is_number(image.get(k)) and image[k] > 0 for k in ("width", "height"))


def _check_image_file(path: Path, image_id: Hashable, json_size: tuple[float, float],
                      findings: _Findings) -> None:
    # libjpeg fills a truncated JPEG with grey and returns it (it only prints a warning), so the
    # end-of-image marker is checked first; truncated PNGs make cv2 return None.
    if _jpeg_truncated(path):
        findings.add("image_unreadable", [image_id])
        return
    pixels = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)  # what the loader does
    if pixels is None:
        findings.add("image_unreadable", [image_id])
    elif (pixels.shape[1], pixels.shape[0]) != json_size:
        findings.add("image_size_mismatch", [image_id])


def _jpeg_truncated(path: Path) -> bool:
    """True for a JPEG (by its magic bytes) without the end-of-image marker near its end."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))  # some writers pad after the marker
        return b"\xff\xd9" not in f.read()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_annotations(anns: list, image_sizes: dict, image_refs: dict, cat_ids: dict,
                       findings: _Findings) -> None:
    """Records annotation-level problems. Counts annotations per category into `cat_ids` and
    reports the images that no annotation refers to."""
    ann_ids: list = []
    annotated: set = set()
    for index, ann in enumerate(anns):
        ann_id = _entry_id(ann)
        ref = _ref(ann, ann_id if ann_id is not None else f"#{index}")  # how the report names it
        if ann_id is None or "image_id" not in ann or "category_id" not in ann:
            findings.add("bad_annotation_entry", [ref])
            if not isinstance(ann, dict):
                continue
        if ann_id is not None:
            ann_ids.append(ann_id)
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        size = image_sizes.get(image_id) if _hashable(image_id) else None
        if size is not None:
            annotated.add(image_id)
        elif "image_id" in ann:
            findings.add("orphan_annotation", [ref])
        if "category_id" in ann:
            if _hashable_in(category_id, cat_ids):
                cat_ids[category_id] += 1
            else:
                findings.add("unknown_category", [ref])
        for key, check in (("area", "missing_area"), ("iscrowd", "missing_iscrowd")):
            if key not in ann:
                findings.add(check, [ref])
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) and math.isfinite(v)
                                                                   for v in bbox)):
            findings.add("non_finite_box", [ref])
            continue
        x, y, w, h = bbox
        width, height = size or (math.inf, math.inf)  # orphans are reported above
        if clipped_box(bbox, width, height) is None:  # the loader's own rule: dropped in training
            findings.add("zero_size_box", [ref])
            continue
        if (x < -EDGE_TOLERANCE or y < -EDGE_TOLERANCE or x + w > width + EDGE_TOLERANCE
                or y + h > height + EDGE_TOLERANCE):
            findings.add("box_outside_image", [ref])
    if dups := _duplicates(ann_ids):
        findings.add("duplicate_annotation_id", dups)
    if without := [i for i in dict.fromkeys(image_sizes) if i not in annotated]:
        findings.add("image_without_annotations", [image_refs.get(i, i) for i in without])
    if unused := [c for c, n in cat_ids.items() if n == 0]:
        findings.add("unused_category", unused)


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _hashable_in(value: Any, mapping: dict) -> bool:
    """`value in mapping` that is False (not TypeError) for an unhashable value such as a list."""
    return _hashable(value) and value in mapping
