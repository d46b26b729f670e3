"""COCO-format detection dataset read with pycocotools.

Samples hold the image as RGB uint8 (H, W, 3) and boxes as xyxy float32 pixels with contiguous
labels 0..K-1 (COCO's sparse category ids are mapped at this boundary and back in the evaluator).
Crowd annotations are excluded from the targets; images without annotations stay, as negatives.
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..boxes import MIN_BOX_SIDE, box_areas_valid
from ..errors import DataError, MissingFileError
from .images import decode_rgb

logger = logging.getLogger(__name__)


def load_coco(annotations: str | Path, dataset: Optional[dict] = None) -> COCO:
    """pycocotools' COCO without its console chatter, with errors that name the file. `dataset`,
    when given, is the file's already parsed json (COCO train's takes seconds to parse)."""
    path = Path(annotations)
    if dataset is None and not path.is_file():
        raise MissingFileError(f"annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if dataset is None:
                return COCO(str(path))
            coco = COCO()
            coco.dataset = dataset
            coco.createIndex()
            return coco
    except (ValueError, KeyError, TypeError, AssertionError) as error:
        raise DataError(f"{path}: not a COCO instances json ({type(error).__name__}: {error})") from None


def categories(coco: COCO) -> tuple[list[int], list[str]]:
    """The dataset's category ids, sorted, and their names. Contiguous label k is the k-th id:
    every place that maps labels to ids and back uses this one order."""
    cat_ids = sorted(coco.getCatIds())
    return cat_ids, [coco.cats[c]["name"] for c in cat_ids]


def clipped_box(bbox, width: float, height: float) -> list[float] | None:
    """COCO [x, y, w, h] -> xyxy clipped to the image, or None when it is not 4 finite numbers or
    a side is under MIN_BOX_SIDE after clipping."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if not np.isfinite([x, y, w, h]).all():  # before clipping, which would turn NaN / inf into edges
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        # float32, as the boxes are stored and as the transform re-checks them
        box = np.float32([max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)])
        if not box_areas_valid(box, MIN_BOX_SIDE):
            return None
    return box.tolist()


def label_mapping(coco: COCO, mode: str = "contiguous") -> tuple[dict[int, int], list[str]]:
    """(label -> category id, class name per label) for `data.label_map` mode:
    contiguous: label k is the k-th sorted category id (K labels);
    category_id: label k is category id k (max id + 1 labels, those without a category "N/A"),
    torchvision's convention for its COCO models (91 outputs)."""
    cat_ids, names = categories(coco)
    if mode == "contiguous":
        return dict(enumerate(cat_ids)), names
    if mode != "category_id":
        raise ValueError(f"label map must be 'contiguous' or 'category_id', got {mode!r}")
    if cat_ids and min(cat_ids) < 0:
        raise DataError(f"label_map category_id needs non-negative category ids, got {min(cat_ids)}")
    by_id = dict(zip(cat_ids, names))
    num_labels = max(cat_ids) + 1 if cat_ids else 0
    return {c: c for c in cat_ids}, [by_id.get(k, "N/A") for k in range(num_labels)]


class CocoDetection(Dataset):
    """__getitem__(i) -> dict(image (H, W, 3) uint8 RGB, boxes (n, 4) float32 xyxy, labels (n,) int64,
    image_id int, orig_size (h, w)), passed through `transform` when one is given.

    Annotations whose box is not 4 finite numbers or has (after clipping to the image) a side
    under MIN_BOX_SIDE pixels are dropped at load with one counted warning (they cannot be
    matched and crash augmentation); other boxes are clipped to the image. An image file that
    cannot be read is an error naming it, or with `skip_bad_images` a warning naming it: missing
    files are left out at load; an unreadable one met later is replaced by the next image
    (`replace_bad_images`, training: batches keep their size) or, for evaluation, returned as a
    stub dict(image_id, unreadable=path) that `Collate` leaves out of the batch and records in
    `Batch.skipped`, so that every image is scored at most once and the unreadable ones not at all.
    """

    def __init__(self, images_dir: str | Path, annotations: str | Path,
                 transform: Optional[Callable[[dict], dict]] = None, label_map: str = "contiguous",
                 skip_bad_images: bool = False, dataset: Optional[dict] = None,
                 replace_bad_images: bool = True):
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations)
        if not self.images_dir.is_dir():
            raise MissingFileError(f"image folder not found: {self.images_dir} "
                                   f"(for annotations {self.annotations_file})")
        self.coco = load_coco(self.annotations_file, dataset)
        self.transform = transform
        self.cat_ids = categories(self.coco)[0]
        if not self.cat_ids:
            raise DataError(f"{self.annotations_file}: no categories; a detection dataset needs "
                            "a non-empty 'categories' list")
        self.label_to_cat_id, self.class_names = label_mapping(self.coco, label_map)
        self.cat_id_to_label = {c: label for label, c in self.label_to_cat_id.items()}
        self.image_ids = sorted(self.coco.getImgIds())
        self.skip_bad_images = skip_bad_images
        self.replace_bad_images = replace_bad_images
        self.skipped_images: list[int] = []  # ids of images left out or replaced (this process)
        if skip_bad_images:
            missing = [i for i in self.image_ids if not self.image_path(i).is_file()]
            if missing:
                logger.warning("%s: leaving out %d image(s) whose file is missing (first ids: %s, "
                               "files: %s; data.skip_bad_images is true)", self.annotations_file,
                               len(missing), missing[:5], [str(self.image_path(i)) for i in missing[:5]])
                self.skipped_images += missing
                self.image_ids = [i for i in self.image_ids if i not in set(missing)]
            if not self.image_ids:
                raise DataError(f"{self.annotations_file}: none of the image files exist under "
                                f"{self.images_dir}")
        self._dropped: list[int] = []  # ids of degenerate annotations left out
        self._size_mismatch: set[int] = set()  # ids of images whose file is not the json's size
        self._targets = {i: self._load_targets(i) for i in self.image_ids}
        if self._dropped:  # out of the evaluation's ground truth too: no target, no missed object
            dropped = set(self._dropped)
            self.coco.dataset = dict(self.coco.dataset, annotations=[
                a for a in self.coco.dataset["annotations"] if a.get("id") not in dropped])
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco.createIndex()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _load_targets(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        info = self.coco.imgs[image_id]
        width, height = info["width"], info["height"]
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            if ann["category_id"] not in self.cat_id_to_label:
                raise DataError(f"{self.annotations_file}: annotation {ann['id']} of image {image_id} "
                                f"has unknown category_id {ann['category_id']}")
            box = clipped_box(ann.get("bbox"), width, height)
            if box is None:
                self._dropped.append(ann["id"])
                continue
            boxes.append(box)
            labels.append(self.cat_id_to_label[ann["category_id"]])
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64))

    def targets(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (n, 4) xyxy and labels (n,) of an image as loaded (before any transform)."""
        return self._targets[image_id]

    def class_counts(self) -> list[int]:
        """Number of (non-crowd, non-degenerate) boxes per contiguous label."""
        labels = [lab for _, lab in self._targets.values()]
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return np.bincount(all_labels, minlength=self.num_classes).tolist()

    def aspect_groups(self) -> list[int]:
        """Per dataset index: 0 for landscape or square images (width >= height), 1 for portrait,
        from the json's sizes (for aspect-ratio grouped batches)."""
        return [0 if self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] else 1
                for i in self.image_ids]

    def report_dropped(self) -> int:
        """Logs (once) and returns how many degenerate annotations were dropped."""
        if self._dropped:
            logger.warning("%s: dropped %d annotation(s) whose box is not 4 finite numbers or is "
                           "under %g px wide or high inside the image (first ids: %s)",
                           self.annotations_file, len(self._dropped), MIN_BOX_SIDE, self._dropped[:5])
        return len(self._dropped)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, image_id: int) -> Path:
        return self.images_dir / self.coco.imgs[image_id]["file_name"]

    def read_image(self, image_id: int) -> np.ndarray:
        """The upright RGB image; MissingFileError when it cannot be decoded, DataError when its
        size is not the json's (its boxes would sit in the wrong place)."""
        image, problem = self._decode(image_id)
        if image is None:
            error = DataError if image_id in self._size_mismatch else MissingFileError
            raise error(f"cannot read image {self.image_path(image_id)} (image id {image_id} of "
                        f"{self.annotations_file}): {problem}; replace the file, or set "
                        "data.skip_bad_images=true to skip it")
        return image

    def _decode(self, image_id: int) -> tuple[Optional[np.ndarray], str]:
        """(image, "") or (None, what is wrong with the file)."""
        image = decode_rgb(self.image_path(image_id))
        if image is None:
            return None, "missing, not an image or truncated"
        info = self.coco.imgs[image_id]
        if image.shape[:2] != (info["height"], info["width"]):
            self._size_mismatch.add(image_id)
            return None, (f"it is {image.shape[1]}x{image.shape[0]} upright (EXIF orientation "
                          f"applied) but the json says {info['width']}x{info['height']}")
        return image, ""

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        for attempt in range(len(self.image_ids)):
            try:
                image = self.read_image(image_id)
                break
            except (MissingFileError, DataError):
                if not self.skip_bad_images:
                    raise
                self.skipped_images.append(image_id)
                path = self.image_path(image_id)
                problem = self._decode(image_id)[1]
                if not self.replace_bad_images:
                    logger.warning("cannot read image %s (image id %d of %s: %s): left out of the "
                                   "evaluation (data.skip_bad_images is true)", path, image_id,
                                   self.annotations_file, problem)
                    return {"image_id": image_id, "unreadable": str(path)}
                logger.warning("cannot read image %s (image id %d of %s: %s): using the next image "
                               "instead (data.skip_bad_images is true; %d skipped in this process "
                               "so far)", path, image_id, self.annotations_file, problem,
                               len(self.skipped_images))
                image_id = self.image_ids[(index + attempt + 1) % len(self.image_ids)]
        else:
            raise MissingFileError(f"{self.annotations_file}: no image under {self.images_dir} "
                                   "can be read")
        boxes, labels = self._targets[image_id]
        sample = {"image": image, "boxes": boxes, "labels": labels, "image_id": image_id,
                  "orig_size": (image.shape[0], image.shape[1])}
        return self.transform(sample) if self.transform is not None else sample
