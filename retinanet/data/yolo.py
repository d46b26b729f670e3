"""YOLO text labels (the ultralytics layout) -> the in-memory COCO dict (see retinanet.data.formats).

    dataset/data.yaml            names: [cat, dog] (or {0: cat, 1: dog})
    dataset/images/train/a.jpg   (subfolders too)
    dataset/labels/train/a.txt   one line per box: class cx cy w h

The label file of images/<split>/<path>.<ext> is labels/<split>/<path>.txt (ultralytics' rule:
the last `images` folder of the image path replaced by `labels`). Coordinates are normalised by
the width and height of the upright image (EXIF orientation applied, as ultralytics does). Class
index i becomes category id i + 1 with the name names[i]. An image without a label file, or with
an empty one, is a negative.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError, MissingFileError
from .images import image_size

# Written by labelImg and similar tools beside the labels: the class names, not an image's boxes.
CLASSES_FILE = "classes.txt"


def read_names(path: Path) -> list[str]:
    """The class names of a data.yaml's `names` (a list, or a dict {index: name} with keys 0..K-1)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DataError(f"{path}: invalid YAML: {' '.join(str(error).split())}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and set(names) == set(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: `names` must be a non-empty list of class names or a dict "
                        "{0: name, 1: name, ...}")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{path}: nc is {data['nc']} but `names` has {len(names)} names")
    return [str(name) for name in names]


def labels_and_names(images_dir: Path, annotations: Path,
                     classes: list[str] | None) -> tuple[Path, list[str]]:
    """(labels folder, class names) for `annotations` = a data.yaml or a labels folder."""
    if annotations.is_file():
        parts = images_dir.parts
        if "images" not in parts:
            raise DataError(f"{images_dir}: labels are found by replacing the last `images` folder "
                            "of the images path by `labels`, and this path has none: set the "
                            "annotations to the labels folder instead")
        i = len(parts) - 1 - parts[::-1].index("images")
        labels_dir, yaml_file = Path(*parts[:i], "labels", *parts[i + 1:]), annotations
        if not labels_dir.is_dir():
            raise MissingFileError(f"labels folder not found: {labels_dir} (for images {images_dir})")
    else:
        labels_dir = annotations
        yaml_file = next((p / "data.yaml" for p in (annotations.parent, annotations.parent.parent)
                          if (p / "data.yaml").is_file()), None)
    if yaml_file is None:
        if classes is None:
            raise ConfigError(f"{annotations}: no data.yaml above the labels folder to name the "
                              "classes: set data.classes (--classes) or point the annotations at it")
        return labels_dir, list(classes)
    names = read_names(yaml_file)
    if classes is not None and list(classes) != names:
        raise ConfigError(f"data.classes {list(classes)} differs from the names in {yaml_file}: "
                          f"{names}; remove data.classes or make them equal")
    return labels_dir, names


def read_yolo(images_dir: str | Path, annotations: str | Path, image_names: list[str],
              classes: list[str] | None = None) -> tuple[dict, list[tuple[str, str, str]]]:
    """-> (COCO dict, problems as (check, "file:line", detail)). `image_names`: the image files
    under `images_dir` (relative paths); `classes`: the names when no data.yaml is found. Lines
    with a problem, and images whose size cannot be read, are left out of the dict."""
    images_dir, annotations = Path(images_dir), Path(annotations)
    labels_dir, names = labels_and_names(images_dir, annotations, classes)
    images, anns, problems, stems = [], [], [], set()
    for name in image_names:
        stem = str(Path(name).with_suffix(""))
        stems.add(stem)
        try:
            height, width = image_size(images_dir / name)
        except OSError:
            problems.append(("image_unreadable", str(images_dir / name), "no image size in its header"))
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": name, "width": width, "height": height,
                       "source": str(images_dir / name)})
        label = labels_dir / f"{stem}.txt"
        if label.is_file():
            for where, category, bbox in _boxes(label, width, height, len(names), problems):
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category,
                             "bbox": bbox, "area": max(bbox[2], 0) * max(bbox[3], 0),
                             "iscrowd": 0, "source": where})
    for label in sorted(labels_dir.rglob("*.txt")):
        stem = str(label.relative_to(labels_dir).with_suffix(""))
        if stem not in stems and stem != Path(CLASSES_FILE).stem:
            problems.append(("label_without_image", str(label), f"no {stem}.* image in {images_dir}"))
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    return ({"info": {"description": f"YOLO labels {labels_dir}"}, "images": images,
             "annotations": anns, "categories": categories}, problems)


def _boxes(label: Path, width: int, height: int, num_classes: int, problems: list):
    """Yields (where, category id, COCO bbox in pixels) per valid line of a label file; records
    the others in `problems`."""
    try:
        lines = label.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        problems.append(("bad_label_line", str(label), "not a text file"))
        return
    for number, line in enumerate(lines, 1):
        fields, where = line.split(), f"{label}:{number}"
        if not fields:
            continue
        if len(fields) != 5:
            problems.append(("bad_label_line", where, f"{len(fields)} fields, need 5 (segment and "
                                                      "pose labels are not boxes)"))
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            problems.append(("bad_label_line", where, f"not numbers: {line.strip()!r}"))
            continue
        if not all(math.isfinite(v) for v in values):
            problems.append(("bad_label_line", where, f"not finite: {line.strip()!r}"))
            continue
        index, cx, cy, w, h = values
        if not index.is_integer() or not 0 <= index < num_classes:
            problems.append(("class_out_of_range", where, f"class {fields[0]}, names has "
                                                          f"0..{num_classes - 1}"))
            continue
        yield where, int(index) + 1, [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
