"""Running a Detector over image files: input expansion, reading, drawing and the detections json.

`tools/infer.py` is the command line; everything here is usable from Python:

    files, root = expand_inputs("photos/*.jpg")
    summary = infer_files(detector, files, root, "out/", score_thresh=0.3)

The json (`detections_document`) is a COCO instances file: "images" (id = index in the input
order, which a skipped unreadable file leaves unused; file_name relative to `root`, width, height,
visualization = the drawn file's name), "categories" (the model's, with their
dataset ids), "annotations" (one per kept detection: id, image_id, file_name, category_id,
category_name, bbox [x, y, w, h] rounded to 2 decimals, area, iscrowd 0, score) and "info".
So it loads with pycocotools and CocoDetection(root, json) as pseudo-labels, and its
"annotations" list is also a valid COCO results list for COCOeval.loadRes.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .data.images import IMAGE_SUFFIXES, decode_rgb
from .errors import ConfigError, DataError, MissingFileError
from .visualize import save_detections

# A folder or a glob gives its IMAGE_SUFFIXES files (case-insensitive); a named file may have any.
_GLOB_CHARS = set("*?[")


def expand_inputs(spec: str | Path) -> tuple[list[Path], Path]:
    """An image file, a folder (its image files, not recursive) or a glob pattern (`**` recurses)
    -> (files sorted by path, root folder that file names in the json are relative to: the
    folder, the file's folder, or the deepest folder common to the glob's matches).
    Raises MissingFileError naming `spec` when nothing matches."""
    spec = str(spec)
    path = Path(spec)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and _is_image(p))
        if not files:
            raise MissingFileError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {spec}")
        return files, path
    if not _GLOB_CHARS & set(spec):
        raise MissingFileError(f"input not found: {spec} (give an image file, a folder or a glob "
                               "pattern such as 'photos/*.jpg', quoted so the shell leaves it alone)")
    matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    files = [p for p in matches if _is_image(p)]
    if not files:
        found = f" ({len(matches)} files matched, none with an image extension)" if matches else ""
        raise MissingFileError(f"no image files match the pattern {spec}{found}")
    return files, Path(os.path.commonpath([str(p.parent.absolute()) for p in files]))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file -> RGB uint8 (H, W, 3), read with cv2 as the dataset does (EXIF orientation
    applied, grey and 16-bit images converted to 8-bit colour). DataError naming the file when
    it cannot be decoded."""
    image = decode_rgb(path)
    if image is None:
        raise DataError(f"cannot read image {path} (missing, not an image or truncated; "
                        "--skip-bad skips such files)")
    return image


def output_names(files: Sequence[Path]) -> list[str]:
    """One visualisation file name per input, <stem>.png; a stem met again (a.jpg and a.png, or
    the same name in two folders) gets _1, _2, ... in input order."""
    names, used = [], set()
    for path in files:
        name, n = f"{path.stem}.png", 0
        while name.lower() in used:
            n += 1
            name = f"{path.stem}_{n}.png"
        used.add(name.lower())
        names.append(name)
    return names


def coco_bbox(box: Sequence[float]) -> list[float]:
    """xyxy -> COCO [x, y, w, h] rounded to 2 decimals. The corners are rounded first, so that
    x + w never passes the image edge that x1 respected."""
    x0, y0, x1, y1 = (round(float(v), 2) for v in box)
    return [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)]


def detection_entries(*, image_id: int, file_name: str, boxes: np.ndarray, scores: np.ndarray,
                      category_ids: np.ndarray, names: dict[int, str], first_id: int) -> list[dict]:
    """One image's detections (boxes (N, 4) xyxy, scores (N,), category_ids (N,)) -> annotation
    dicts with ids first_id, first_id + 1, ..."""
    entries = []
    for k, (box, score, cat_id) in enumerate(zip(boxes, scores, category_ids)):
        bbox = coco_bbox(box)
        entries.append({"id": first_id + k, "image_id": image_id, "file_name": file_name,
                        "category_id": int(cat_id), "category_name": names.get(int(cat_id), str(cat_id)),
                        "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                        "score": round(float(score), 4)})
    return entries


def coco_categories(cat_names: dict[int, str]) -> list[dict]:
    """The json's "categories" from category id -> name."""
    return [{"id": cat, "name": name, "supercategory": ""} for cat, name in sorted(cat_names.items())]


def detections_document(images: list[dict], annotations: list[dict], categories: list[dict],
                        info: dict) -> dict:
    """The json written by infer_files (see the module docstring)."""
    return {"info": info, "licenses": [], "images": images, "categories": categories,
            "annotations": annotations}


@dataclass
class InferenceSummary:
    """What infer_files did: counts for the printed summary, and the json document."""
    num_images: int = 0
    num_detections: int = 0  # above the model's own score threshold (model.postprocess.score_thresh)
    num_kept: int = 0  # of those, with score >= the requested threshold
    num_uncategorised: int = 0  # labels without a dataset category (torchvision's "N/A"): left out
    skipped: list[str] = field(default_factory=list)  # unreadable files (with skip_bad)
    kept_per_class: dict[str, int] = field(default_factory=dict)
    document: dict = field(default_factory=dict)


def model_categories(detector) -> dict[int, str]:
    """A Detector's dataset category id -> class name (labels without a category left out)."""
    return {cat: detector.class_names[label] for label, cat in detector.label_to_cat_id.items()}


def keep_detections(summary: InferenceSummary, out: dict, score_thresh: float, *, image_id: int,
                    file_name: str, cat_names: dict[int, str], first_id: int) -> tuple[np.ndarray, list[dict]]:
    """One image's Detector.predict output -> (keep mask (N,): a dataset category and score >=
    score_thresh, the kept detections' annotation entries); adds them to summary's counts."""
    scores = out["scores"].numpy()
    category_ids = out["category_ids"].numpy()
    known = category_ids >= 0
    keep = known & (scores >= score_thresh)
    summary.num_detections += len(scores)
    summary.num_uncategorised += int((~known).sum())
    summary.num_kept += int(keep.sum())
    entries = detection_entries(image_id=image_id, file_name=file_name, boxes=out["boxes"].numpy()[keep],
                                scores=scores[keep], category_ids=category_ids[keep], names=cat_names,
                                first_id=first_id)
    for entry in entries:
        summary.kept_per_class[entry["category_name"]] += 1
    return keep, entries


def document_info(detector, score_thresh: float, **more) -> dict:
    """The json's "info": the thresholds that shaped it, and `more`."""
    return {"description": "retinanet tools/infer.py detections", **more, "score_threshold": score_thresh,
            "model_score_threshold": float(detector.postprocessor.score_thresh),
            "max_detections_per_image": int(detector.postprocessor.max_detections)}


def check_output_dir(output_dir: str | Path) -> Path:
    """ConfigError when `output_dir` exists and is no folder."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output {output_dir} exists and is not a folder; choose another --output")
    return output_dir


def infer_files(detector, files: Sequence[Path], root: Path, output_dir: str | Path, *,
                score_thresh: float = 0.3, batch_size: int = 1, skip_bad: bool = False,
                draw: bool = True, slice=None, log: Callable[[str], None] = print) -> InferenceSummary:
    """Runs `detector` (a retinanet.Detector) on `files` in batches, writes
    output_dir/<stem>.png (detections with score >= score_thresh drawn) and
    output_dir/detections.json. An unreadable file is a DataError naming it, or with `skip_bad`
    a warning (through `log`) and a count. Images are read one batch at a time. `slice`: sliced
    inference, as Detector.predict takes it (a retinanet.slicing.Slicing or (height, width))."""
    output_dir = check_output_dir(output_dir)
    names = output_names(files)
    # Writing <stem>.png into the input folder would replace the inputs that are PNGs.
    inputs = {Path(f).resolve() for f in files}
    clash = next((n for n in names if (output_dir / n).resolve() in inputs), None)
    if clash:
        raise ConfigError(f"output {output_dir / clash} would overwrite an input image; choose "
                          "another --output folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    cat_names = model_categories(detector)
    summary = InferenceSummary(kept_per_class={name: 0 for name in cat_names.values()})
    images, annotations = [], []
    for start in range(0, len(files), batch_size):
        batch = []  # (index, path, image)
        for index in range(start, min(start + batch_size, len(files))):
            try:
                batch.append((index, files[index], read_rgb(files[index])))
            except DataError as error:
                if not skip_bad:
                    raise
                summary.skipped.append(str(files[index]))
                log(f"warning: {error}; skipped ({len(summary.skipped)} so far)")
        if not batch:
            continue
        outputs = detector.predict([image for _, _, image in batch], slice=slice)
        for (index, path, image), out in zip(batch, outputs):
            file_name = _relative(path, root)
            images.append({"id": index, "file_name": file_name, "width": int(image.shape[1]),
                           "height": int(image.shape[0]), "visualization": names[index]})
            keep, entries = keep_detections(summary, out, score_thresh, image_id=index, file_name=file_name,
                                            cat_names=cat_names, first_id=len(annotations) + 1)
            annotations += entries
            if draw:
                save_detections(output_dir / names[index], image, out["boxes"].numpy()[keep],
                                out["labels"].numpy()[keep].tolist(), out["scores"].numpy()[keep].tolist(),
                                detector.class_names)
        summary.num_images += len(batch)
    info = document_info(detector, score_thresh, images_root=str(Path(root).absolute()),
                         skipped_files=summary.skipped)
    summary.document = detections_document(images, annotations, coco_categories(cat_names), info)
    (output_dir / "detections.json").write_text(json.dumps(summary.document))
    return summary


def _relative(path: Path, root: Path) -> str:
    """path relative to root, with forward slashes (COCO file names), or absolute if outside."""
    try:
        return Path(path).absolute().relative_to(Path(root).absolute()).as_posix()
    except ValueError:
        return Path(path).absolute().as_posix()
