"""A hostile COCO dataset: every problem `retinanet.data.checks` knows about, at least once.

`make_hostile_coco(root)` writes small PNG/JPEG files and an instances json by hand (no
pycocotools) and returns the paths and, per check, the ids that must be reported. Reused by tests
that train or load on hostile data.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT = 40, 30  # json and real size of every image except the mismatching one


def _png(path: Path, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    ok, data = cv2.imencode(path.suffix, pixels)
    assert ok
    path.write_bytes(data.tobytes())
    return data.tobytes()


def make_hostile_coco(root: Path) -> dict:
    """Writes root/images/* and root/annotations.json.

    Returns {"images": Path, "annotations": Path, "errors": {check: ids}, "warnings": {check: ids},
    "read_only_checks": the checks that need the image files decoded (absent with
    read_images=False)}. Ids are image, annotation or category ids as the check name says, in file
    order as the report gives them (it shows the first 5; the count is len(ids), or 1 when the
    list is empty).
    """
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["ok.png", "mismatch.png", "empty.png", "dup_a.png", "dup_b.png"]):
        _png(images_dir / name, seed=i)
    full_png = _png(images_dir / "truncated.png", seed=10)
    (images_dir / "truncated.png").write_bytes(full_png[: len(full_png) // 2])
    full_jpg = _png(images_dir / "truncated.jpg", seed=11)
    (images_dir / "truncated.jpg").write_bytes(full_jpg[: len(full_jpg) // 2])  # cv2 still decodes it
    (images_dir / "not_an_image.png").write_text("this is not a PNG\n")

    def image(image_id, file_name, width=WIDTH, height=HEIGHT):
        return {"id": image_id, "file_name": file_name, "width": width, "height": height}

    images = [image(1, "ok.png"),
              image(2, "missing.png"),
              image(3, "truncated.png"),
              image(4, "not_an_image.png"),
              image(5, "truncated.jpg"),
              image(6, "mismatch.png", width=WIDTH + 10),  # the file is 40 px wide
              image(7, "empty.png"),  # no annotation: a negative
              image(8, "dup_a.png"),
              image(8, "dup_b.png")]  # duplicate id

    def ann(ann_id, bbox, image_id=1, category_id=1, drop=()):
        entry = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
                 "area": 0.0, "iscrowd": 0}
        if isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox):
            entry["area"] = float(bbox[2] * bbox[3])
        for key in drop:
            entry.pop(key)
        return entry

    nan, inf = math.nan, math.inf
    annotations = [
        ann(1, [2, 2, 10, 10]),                       # fine
        ann(2, [5, 5, 0, 10]),                        # zero width
        ann(3, [5, 5, 4, -3]),                        # negative height
        ann(4, [nan, 1, 4, 4]),                       # NaN
        ann(5, [1, 1, inf, 4]),                       # inf
        ann(6, ["a", 1, 2, 3]),                       # not a number
        ann(7, [1, 2, 3]),                            # wrong length
        ann(8, [2, 2, 5, 5], category_id=99),         # unknown category
        ann(9, [3, 3, 5, 5], category_id=2),          # duplicate annotation id ...
        ann(9, [4, 4, 5, 5], category_id=2),          # ... here
        ann(10, [2, 2, 5, 5], image_id=404),          # no such image
        ann(11, [30, 20, 20, 20]),                    # x1 = 50 > 40, y1 = 40 > 30
        ann(12, [6, 6, 5, 5], drop=["area"]),         # no area
        ann(13, [7, 7, 5, 5], drop=["iscrowd"]),      # no iscrowd
        ann(14, None, drop=["bbox"]),                 # no bbox at all
        ann(15, [1, 1, -2, 3]),                       # more zero-size boxes: 6 in all, so
        ann(16, [1, 1, 3, 0]),                        # the report lists only the first 5
        ann(17, [1, 1, 0, 0]),
        ann(18, [1, 1, -1, -1]),
    ]
    # One fine box on every other image, so that only image 7 is without annotations.
    annotations += [ann(100 + i, [1, 1, 8, 8], image_id=i) for i in (2, 3, 4, 5, 6, 8)]
    categories = [{"id": 1, "name": "one", "supercategory": "x"},
                  {"id": 2, "name": "two", "supercategory": "x"},
                  {"id": 3, "name": "unused", "supercategory": "x"}]
    ann_file = root / "annotations.json"
    # No "info": a warning. json.dumps writes NaN / Infinity literals, as some exporters do.
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": categories, "licenses": []}))
    errors = {"image_missing": [2], "image_unreadable": [3, 4, 5], "image_size_mismatch": [6],
              "duplicate_image_id": [8], "duplicate_annotation_id": [9], "orphan_annotation": [10],
              "unknown_category": [8], "non_finite_box": [4, 5, 6, 7, 14],
              "zero_size_box": [2, 3, 15, 16, 17, 18]}
    warnings = {"box_outside_image": [11], "missing_info": [], "missing_area": [12],
                "missing_iscrowd": [13], "image_without_annotations": [7], "unused_category": [3]}
    return {"images": images_dir, "annotations": ann_file, "errors": errors, "warnings": warnings,
            "read_only_checks": {"image_unreadable", "image_size_mismatch"}}
