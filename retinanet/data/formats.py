"""Dataset formats -> the one in-memory COCO dict that CocoDetection (`dataset=`), the checker and
pycocotools' evaluation read.

    read_dataset(images, annotations, format)    -> (COCO dict, problems)
    load_dataset(images, annotations, format)    -> the dict (None for a COCO json, which
                                                    CocoDetection reads itself), or a DataError
                                                    naming the first problem's file and line
    check_dataset(images, annotations, format)   -> the checker's DatasetReport, for any format
    split_dataset(dataset, val_fraction, seed)   -> (train, val), the same every run

Formats: coco (an instances json), voc (retinanet.data.voc), yolo (retinanet.data.yolo); auto
picks one from what `annotations` names (detect_format). Entries read from VOC and YOLO files
carry a "source" ("file:line") that the checker names them by; coco_json drops it for writing.
Problems are (check, where, detail) tuples, check a key of retinanet.data.checks.CHECKS.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import ConfigError, DataError, MissingFileError
from .checks import CHECKS, DatasetReport, check_coco_dataset
from .images import IMAGE_SUFFIXES
from .voc import read_voc
from .yolo import read_yolo

logger = logging.getLogger(__name__)

FORMATS = ("auto", "coco", "voc", "yolo")
COCO_LISTS = ("images", "annotations", "categories")


def detect_format(annotations: str | Path) -> str:
    """coco, voc or yolo from what `annotations` names (see DatasetConfig.format)."""
    path = Path(annotations)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".json":
            return "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        if suffix == ".txt" and path.parent.parent.name == "ImageSets":
            return "voc"
    elif path.is_dir():
        if (path / "Annotations").is_dir() or next(path.glob("*.xml"), None):
            return "voc"
        if "labels" in path.parts or next(path.rglob("*.txt"), None):
            return "yolo"
    raise DataError(f"{path}: cannot tell the dataset format (a .json is coco; a folder of .xml "
                    "files or ImageSets/Main/<split>.txt is voc; a data.yaml or a labels folder of "
                    ".txt files is yolo): set it (data.<split>.format, --format)")


def resolve_format(format: str, annotations: str | Path, classes: Optional[list[str]] = None) -> str:
    """`format`, or the detected one for auto, once `annotations` is known to exist and
    `classes` to fit the format."""
    if not Path(annotations).exists():
        raise MissingFileError(f"annotation file not found: {annotations}")
    if format not in FORMATS:
        raise ConfigError(f"dataset format {format!r} is not one of {', '.join(FORMATS)}")
    format = detect_format(annotations) if format == "auto" else format
    if classes is not None and format == "coco":
        raise ConfigError(f"{annotations}: data.classes (--classes) names the classes of voc and "
                          "yolo datasets; a COCO json names its own categories: remove it")
    if classes is not None and (not classes or len(set(classes)) != len(classes)):
        raise ConfigError(f"data.classes (--classes) needs distinct names, got {classes}")
    return format


def image_files(folder: Path, recursive: bool) -> list[str]:
    """The image files in `folder` (and its subfolders when `recursive`), relative, sorted."""
    if not folder.is_dir():
        return []
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p.relative_to(folder).as_posix() for p in paths
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_dataset(images: str | Path, annotations: str | Path, format: str = "auto",
                 classes: Optional[list[str]] = None) -> tuple[dict, list[tuple[str, str, str]]]:
    """(COCO dict, problems) of a dataset in any format. Entries with a problem are left out of
    the dict; missing paths and unreadable class lists raise."""
    format = resolve_format(format, annotations, classes)
    if format == "coco":
        try:
            data = json.loads(Path(annotations).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{annotations}: not a COCO instances json ({error})") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in COCO_LISTS):
            raise DataError(f"{annotations}: not a COCO instances json (it needs the lists "
                            f"{', '.join(COCO_LISTS)})")
        return data, []
    reader = read_voc if format == "voc" else read_yolo
    return reader(images, annotations, image_files(Path(images), recursive=format == "yolo"), classes)


def load_dataset(images: str | Path, annotations: str | Path, format: str = "auto",
                 classes: Optional[list[str]] = None, *, tolerate: Iterable[str] = (),
                 log: Optional[Callable[[str], None]] = None) -> dict | None:
    """The COCO dict of a voc or yolo dataset for CocoDetection(dataset=...); None for a COCO
    json (CocoDetection parses it). A problem is a DataError naming its file and line, except
    the checks in `tolerate`, which are logged through `log` (their entries are left out)."""
    format = resolve_format(format, annotations, classes)
    if format == "coco":
        return None
    dataset, problems = read_dataset(images, annotations, format, classes)
    tolerate = set(tolerate)
    stopping = [p for p in problems if p[0] not in tolerate]
    if stopping:
        check, where, detail = stopping[0]
        more = f" ({len(stopping) - 1} more: tools/check_dataset.py lists them)" if stopping[1:] else ""
        raise DataError(f"{where}: {detail}: {CHECKS[check][1]} -- {CHECKS[check][2]}{more}")
    for check, where, detail in problems:
        (log or logger.warning)(f"{where}: {detail}: left out ({check})")
    return dataset


def check_dataset(images: str | Path, annotations: str | Path, *, format: str = "auto",
                  classes: Optional[list[str]] = None, read_images: bool = True) -> DatasetReport:
    """check_coco_dataset for a dataset in any format: a voc or yolo one is checked as the COCO
    dict it is read into, with the reader's problems."""
    format = resolve_format(format, annotations, classes)
    if format == "coco":
        return check_coco_dataset(images, annotations, read_images=read_images)
    dataset, problems = read_dataset(images, annotations, format, classes)
    return check_coco_dataset(images, annotations, read_images=read_images, dataset=dataset,
                              problems=problems)


def split_dataset(dataset: dict, val_fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """(train, val) of a COCO dict: images ordered by file_name, shuffled by random.Random(seed),
    the first round(n * val_fraction) of them (at least 1, at most n - 1) for val. The same files
    and seed give the same split on every machine; ids and categories are kept."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"the validation fraction must be between 0 and 1, got {val_fraction}")
    images = sorted(dataset["images"], key=lambda image: image["file_name"])
    if len(images) < 2:
        raise DataError(f"{len(images)} image(s): a train/val split needs at least 2")
    random.Random(seed).shuffle(images)
    num_val = min(max(round(len(images) * val_fraction), 1), len(images) - 1)
    val_ids = {image["id"] for image in images[:num_val]}

    def subset(in_val: bool) -> dict:
        return {**dataset, "images": [i for i in dataset["images"] if (i["id"] in val_ids) == in_val],
                "annotations": [a for a in dataset["annotations"]
                                if (a["image_id"] in val_ids) == in_val]}
    return subset(False), subset(True)


def coco_json(dataset: dict) -> dict:
    """The dict as a COCO instances json holds it: without the readers' "source" keys."""
    def strip(entries: list) -> list:
        return [{k: v for k, v in entry.items() if k != "source"} for entry in entries]
    return {**dataset, "images": strip(dataset["images"]), "annotations": strip(dataset["annotations"])}
