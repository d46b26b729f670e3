"""The one policy for bad input: per check of the dataset checker (retinanet.data.checks), what
training does with it. The checker's verdict and exit code, the checks training runs when it
starts (retinanet.data.build_dataset) and the table in docs/your-data.md all follow CHECKS.

    stops       training refuses to start, naming the check; the checker says ERROR (exit 1)
    skippable   stops, unless data.skip_bad_images is true: then the images are left out (or, met
                in training, replaced by the next one) with a counted warning; SKIPPED
    repaired    dropped, clipped or filled in, with one counted warning; REPAIRED
    kept        used as it is (nothing is wrong for training); NOTE
"""
from __future__ import annotations

from typing import NamedTuple


class Check(NamedTuple):
    """One kind of problem. policy: one of POLICIES; found: what the report says was found
    (after the count); text: for stops and skippable, why it matters and what to do; for
    repaired and kept, what training does ("training <text>")."""
    policy: str
    found: str
    text: str


POLICIES = ("stops", "skippable", "repaired", "kept")
# The order is the order of the report.
CHECKS: dict[str, Check] = {
    "annotation_file_missing": Check("stops", "annotation file not found",
                                     "check the path (--annotations)"),
    "annotation_file_not_json": Check("stops", "annotation file is not valid JSON",
                                      "nothing can be loaded; fix or regenerate the file"),
    "not_coco_instances": Check("stops", "not a COCO instances json: missing or non-list key(s)",
                                "the top level needs 'images', 'annotations' and 'categories' lists"),
    # Problems of the VOC and YOLO readers (retinanet.data.voc, retinanet.data.yolo).
    "xml_malformed": Check("stops", "annotation file(s) that are not well-formed XML",
                           "fix or regenerate them"),
    "listed_file_missing": Check("stops", "image set line(s) naming an id without an XML file",
                                 "add the file or remove the line"),
    "bad_voc_object": Check("stops", "VOC object(s) without a <name> or 4 numeric <bndbox> corners",
                            "fix them"),
    "unknown_class": Check("stops", "VOC object(s) whose name is not in data.classes",
                           "add the name to data.classes (--classes) or fix it"),
    "bad_label_line": Check("stops", "label line(s) that are not 5 numbers 'class cx cy w h'",
                            "fix the lines"),
    "class_out_of_range": Check("stops", "label line(s) whose class index has no name",
                                "fix the index or add the name to data.yaml"),
    "label_without_image": Check("stops", "label file(s) without an image of the same name",
                                 "their boxes would be lost; add the image or remove the file"),
    # The COCO dict (a json, or what the readers made).
    "images_dir_missing": Check("stops", "image folder not found",
                                "check the path (--images); image files were not checked"),
    "bad_image_entry": Check("stops", "image entry(ies) without an int/str 'id', a 'file_name' or a "
                                      "positive 'width'/'height'",
                             "the loader needs all four; fix the 'images' list"),
    "duplicate_image_id": Check("stops", "image id(s) used by more than one image entry",
                                "pycocotools keeps the last entry and gives it the annotations of "
                                "all; give every image its own id"),
    "image_missing": Check("skippable", "image(s) whose file does not exist",
                           "add the files or remove the entries"),
    "image_unreadable": Check("skippable", "image file(s) that cannot be decoded or are truncated",
                              "re-export or remove them"),
    "image_size_mismatch": Check("skippable", "image(s) whose upright size (EXIF orientation "
                                              "applied) differs from the json width/height",
                                 "their boxes would sit in the wrong place (a resized or rotated "
                                 "copy?); fix width/height or the file"),
    "bad_annotation_entry": Check("stops", "annotation(s) without an int/str 'id', an 'image_id' "
                                           "or a 'category_id'",
                                  "the loader needs all three; fix the 'annotations' list"),
    "duplicate_annotation_id": Check("stops", "annotation id(s) used by more than one annotation",
                                     "pycocotools indexes by id, so evaluation sees the last one "
                                     "twice; give every annotation its own id"),
    "orphan_annotation": Check("stops", "annotation(s) referring to an image id that does not exist",
                               "pycocotools ignores them silently; fix image_id or remove them"),
    "unknown_category": Check("stops", "annotation(s) whose category_id is not in 'categories'",
                              "add the category or fix category_id"),
    "duplicate_category_id": Check("stops", "category id(s) used by more than one category",
                                   "pycocotools keeps only the last one; give every category its "
                                   "own id"),
    "non_finite_box": Check("repaired", "annotation(s) whose bbox is missing, not 4 numbers, NaN or "
                                        "inf", "drops them"),
    "zero_size_box": Check("repaired", "annotation(s) with no extent in their image (zero or "
                                       "negative width/height, under 0.01 px, or wholly outside)",
                           "drops them"),
    "box_outside_image": Check("repaired", "box(es) extending outside their image",
                               "clips them to the image"),
    "missing_info": Check("repaired", "the json has no 'info' field",
                          "adds an empty one (pycocotools 2.0.7 cannot evaluate without it)"),
    "missing_area": Check("repaired", "annotation(s) without 'area'",
                          "sets it to w * h (pycocotools' evaluation needs it)"),
    "missing_iscrowd": Check("repaired", "annotation(s) without 'iscrowd'",
                             "sets it to 0 (pycocotools' evaluation needs it)"),
    "image_without_annotations": Check("kept", "image(s) without annotations",
                                       "keeps them as negatives (all background)"),
    "unused_category": Check("kept", "category(ies) with no annotation",
                             "still gives the model an output for them; remove them if unintended"),
}
# How the checker labels each outcome (outcome(): a skippable problem is skipped or stops).
LABELS = {"stops": "ERROR", "skipped": "SKIPPED", "repaired": "REPAIRED", "kept": "NOTE"}


def outcome(check: str, skip_bad_images: bool = False) -> str:
    """What training does with a problem of `check`: stops | skipped | repaired | kept."""
    policy = CHECKS[check].policy
    if policy == "skippable":
        return "skipped" if skip_bad_images else "stops"
    return policy


def consequence(check: str, skip_bad_images: bool = False) -> str:
    """What training does with a problem of `check` and what to do, in words."""
    policy, _, text = CHECKS[check]
    if policy == "stops":
        return f"training stops: {text}"
    if policy == "skippable":
        return (f"training skips them (data.skip_bad_images is true); {text}" if skip_bad_images else
                f"training stops unless data.skip_bad_images is true (then it skips them): {text}")
    return f"training {text} and goes on" if policy == "repaired" else f"training {text}"
