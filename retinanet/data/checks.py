"""Checks a dataset before training: `check_coco_dataset(images_dir, annotations)` for a COCO
instances json; VOC and YOLO datasets are checked as the COCO dict they are read into
(retinanet.data.formats), their readers' problems and entries named by file and line. What
training does with each problem, and so the report's verdict, is retinanet.data.policy.CHECKS.

The raw json is read with plain `json`, not pycocotools: `COCO()` crashes on some of these errors
and silently merges others (duplicate ids overwrite each other in its index dicts). Each problem
is reported once, with how often it occurs and the first few offending ids.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Iterable

from .coco import clipped_box
from .images import decode_rgb
from .policy import CHECKS, LABELS, consequence, outcome

MAX_IDS = 5  # offending ids listed per problem
# COCO json rounds coordinates to 2 decimals, so x + w may pass the image edge by round-off.
EDGE_TOLERANCE = 0.01


class Where(str):
    """A place in a source file ("labels/a.txt:3"), named by the report instead of an id."""


@dataclass(frozen=True)
class Issue:
    """One kind of problem: `count` occurrences, the first `MAX_IDS` offending ids (image,
    annotation or category ids as the check says; `#k` for an entry at list index k that has no
    usable id) and a one-line message (count, what was found, detail, ids). Its outcome is for
    the data.skip_bad_images setting `skip_bad_images`."""
    check: str
    count: int
    first_ids: tuple
    message: str
    skip_bad_images: bool = False

    @property
    def outcome(self) -> str:
        return outcome(self.check, self.skip_bad_images)

    @property
    def severity(self) -> str:
        """"error" when it stops training, else "warning"."""
        return "error" if self.outcome == "stops" else "warning"

    def __str__(self) -> str:
        return (f"{LABELS[self.outcome]:<8} {self.check}: {self.message} -- "
                f"{consequence(self.check, self.skip_bad_images)}")


@dataclass
class DatasetReport:
    """Result of `check_coco_dataset`: `issues` in CHECKS order; `errors` are those that stop
    training (with the data.skip_bad_images setting the issues are for), `warnings` the rest."""
    images_dir: Path
    annotations: Path
    read_images: bool
    num_images: int = 0
    num_annotations: int = 0
    num_categories: int = 0
    issues: list[Issue] = field(default_factory=list)
    # The parsed json (None when it could not be read): training builds its dataset from it
    # instead of parsing the file a second time.
    dataset: dict | None = field(default=None, repr=False)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.outcome == "stops"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.outcome != "stops"]

    @property
    def ok(self) -> bool:
        """True when nothing stops training."""
        return not self.errors

    def issue(self, check: str) -> Issue | None:
        """The issue reported by `check` (a key of CHECKS), or None when that check passed."""
        return next((i for i in self.issues if i.check == check), None)

    def with_skip_bad_images(self, skip_bad_images: bool) -> DatasetReport:
        """The same report for another data.skip_bad_images setting."""
        issues = [dataclasses.replace(i, skip_bad_images=skip_bad_images) for i in self.issues]
        return dataclasses.replace(self, issues=issues)

    def format(self) -> str:
        """Readable report: a header, one line per problem saying what training does, a verdict."""
        files = "image files read" if self.read_images else "image files only checked to exist"
        lines = [f"{self.annotations} (images in {self.images_dir}): {self.num_images} images, "
                 f"{self.num_annotations} annotations, {self.num_categories} categories; {files}"]
        lines += [str(i) for i in self.errors + self.warnings]
        counts = Counter(i.outcome for i in self.issues)
        tally = (f"{counts['repaired']} repaired, {counts['skipped']} skipped, "
                 f"{counts['kept']} note(s)")
        if self.ok:
            lines.append(f"OK: nothing stops training ({tally})")
        else:
            skippable = [i.check for i in self.errors if CHECKS[i.check].policy == "skippable"]
            hint = (f"; or skip the images of {', '.join(skippable)} with "
                    "data.skip_bad_images=true (--skip-bad-images)") if skippable else ""
            lines.append(f"FAILED: {len(self.errors)} problem(s) stop training ({tally}); "
                         f"fix them before training{hint}")
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

    def issues(self, skip_bad_images: bool) -> list[Issue]:
        issues = []
        for check, (_, found, _) in CHECKS.items():
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
            issues.append(Issue(check, count, first, message, skip_bad_images))
        return issues


def check_coco_dataset(images_dir: str | os.PathLike, annotations: str | os.PathLike, *,
                       read_images: bool = True, dataset: dict | None = None,
                       problems: Iterable[tuple[str, str, str]] = (),
                       skip_bad_images: bool = False) -> DatasetReport:
    """Checks a COCO instances json and its image folder; never raises on bad data.

    read_images: decode every image as training does (retinanet.data.images.decode_rgb) to find
    unreadable or truncated files and upright sizes that disagree with the json; False only checks that the files exist (reading
    all of COCO train2017 takes minutes).
    dataset: the COCO dict already in memory (a VOC or YOLO dataset read by retinanet.data.formats)
    instead of the json file `annotations`; entries with a "source" are named by it, not their id.
    problems: (check, where, detail) found while reading it, reported with the rest.
    skip_bad_images: the data.skip_bad_images setting the verdict is for (see CHECKS).
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
    report.issues = findings.issues(skip_bad_images)
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
    # end-of-image marker is checked first; truncated PNGs make the decoder return None.
    pixels = decode_rgb(path)  # what the loader does: upright, EXIF orientation applied
    if pixels is None:
        findings.add("image_unreadable", [image_id])
    elif (pixels.shape[1], pixels.shape[0]) != json_size:
        findings.add("image_size_mismatch", [image_id])


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
