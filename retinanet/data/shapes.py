"""Built-in synthetic "shapes" detection dataset, written in COCO format.

Images are drawn by `shapes_render.render_image` (the shapes, backgrounds and box conventions
are described there). The dataset is small, fast to generate and fully deterministic, which
makes it a good smoke test for a detector: a working RetinaNet should reach a high mAP on it
within minutes.

COCO annotations use ``bbox = [x0, y0, w, h]`` (render_image's box, rounded to 2 decimals) and
``area = w * h``. Category ids are 1..5 in :data:`CLASS_NAMES` order (1..k in the order of
``classes`` when other names from :data:`SHAPE_NAMES` are chosen, e.g. ``("circle", "diamond",
"hexagon", "ell")``).

Beyond the defaults (128 px, objects 8-64 px, up to 6 per image, 5 classes, 4 background
styles), ``image_size``, ``min_size`` / ``max_size``, ``min_objects`` / ``max_objects``,
``classes`` and ``backgrounds`` make other sets, e.g. large images with many small objects:
``generate_shapes_dataset(out, image_size=1024, min_size=8, max_size=24, min_objects=20,
max_objects=60)``.

Determinism: image ``k`` of a split is rendered from its own child seed of
``SeedSequence([seed, split_index])``, so the same arguments always give
byte-identical PNG and JSON files, an image never depends on how many random
numbers earlier images drew, and a larger split extends a smaller one.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from .shapes_render import (BACKGROUNDS, CLASS_NAMES, SHAPE_NAMES, Box, ImageSize, check_choices,
                            parse_image_size, render_image)

__all__ = ["CLASS_NAMES", "SHAPE_NAMES", "BACKGROUNDS", "generate_shapes_dataset", "render_image",
           "is_complete"]

# Bump when the rendering changes, so that `is_complete` rejects stale datasets.
GENERATOR_VERSION = 1

SPLITS: tuple[str, ...] = ("train", "val")
_OWN_PNG = re.compile(r"\d+\.png")  # file names this module writes

Progress = Callable[[str, int, int], None]


def _normalize_params(*, num_train=2000, num_val=200, image_size=128, min_size=8, max_size=64,
                      max_objects=6, seed=0, min_objects=1, classes=CLASS_NAMES,
                      backgrounds=BACKGROUNDS) -> dict:
    """All generation parameters in canonical, JSON-comparable form. The options added later
    (min_objects, classes, backgrounds) are written only when not at their default, so that a
    default dataset's meta.json stays what it was (and an existing dataset stays complete)."""
    h, w = parse_image_size(image_size)
    if int(seed) < 0:
        raise ValueError("seed must be non-negative")
    check_choices(list(classes), SHAPE_NAMES, "classes")
    check_choices(list(backgrounds), BACKGROUNDS, "backgrounds")
    params = {"generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
              "image_size": [h, w], "min_size": float(min_size), "max_size": float(max_size),
              "max_objects": int(max_objects), "seed": int(seed)}
    extra = {"min_objects": int(min_objects), "classes": list(classes), "backgrounds": list(backgrounds)}
    defaults = {"min_objects": 1, "classes": list(CLASS_NAMES), "backgrounds": list(BACKGROUNDS)}
    params.update({key: value for key, value in extra.items() if value != defaults[key]})
    return params


def _render_options(params: dict) -> dict:
    """render_image's keyword arguments from normalised params."""
    return {"image_size": tuple(params["image_size"]), "min_size": params["min_size"],
            "max_size": params["max_size"], "max_objects": params["max_objects"],
            "min_objects": params.get("min_objects", 1),
            "classes": tuple(params.get("classes", CLASS_NAMES)),
            "backgrounds": tuple(params.get("backgrounds", BACKGROUNDS))}


def _file_name(index: int, count: int) -> str:
    return f"{index:0{max(6, len(str(count)))}d}.png"


def _annotation(ann_id: int, image_id: int, category_id: int, box: Box) -> dict:
    x0, y0, x1, y1 = (round(float(v), 2) for v in box)
    bw, bh = round(x1 - x0, 2), round(y1 - y0, 2)
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "bbox": [x0, y0, bw, bh], "area": round(bw * bh, 2), "iscrowd": 0}


def _coco_header(split: str, classes: tuple[str, ...]) -> dict:
    info = {"description": f"RetinaNet synthetic shapes dataset ({split} split)",
            "version": f"{GENERATOR_VERSION}.0", "year": 2024, "contributor": "retinanet.data.shapes",
            "url": "", "date_created": "2024-01-01"}  # fixed: output must be byte-identical across runs
    return {"info": info, "licenses": [], "images": [], "annotations": [],
            "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                           for i, name in enumerate(classes)]}


def _clear_split_dir(split_dir: Path) -> None:
    """Remove PNGs a previous run wrote (only our own numeric names), so counts stay exact."""
    for p in split_dir.glob("*.png"):
        if _OWN_PNG.fullmatch(p.name):
            p.unlink()


def _generate_split(out_dir: Path, split: str, split_index: int, num: int, params: dict,
                    progress: Optional[Progress]) -> Path:
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    _clear_split_dir(split_dir)
    h, w = params["image_size"]
    options = _render_options(params)
    coco = _coco_header(split, options["classes"])
    children = np.random.SeedSequence([params["seed"], split_index]).spawn(num)
    for i, child in enumerate(children):
        image_id = i + 1
        image, objects = render_image(np.random.default_rng(child), **options)
        file_name = _file_name(image_id, num)
        Image.fromarray(image, "RGB").save(split_dir / file_name, format="PNG")
        coco["images"].append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        for name, box in objects:
            coco["annotations"].append(_annotation(len(coco["annotations"]) + 1, image_id,
                                                   options["classes"].index(name) + 1, box))
        if progress is not None:
            progress(split, i + 1, num)

    json_path = out_dir / "annotations" / f"instances_{split}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(coco, f, indent=None, sort_keys=False)
    return json_path


def generate_shapes_dataset(out_dir: Union[str, os.PathLike], *, num_train: int = 2000, num_val: int = 200,
                            image_size: ImageSize = 128, min_size: float = 8, max_size: float = 64,
                            max_objects: int = 6, seed: int = 0, min_objects: int = 1,
                            classes: Sequence[str] = CLASS_NAMES, backgrounds: Sequence[str] = BACKGROUNDS,
                            progress: Optional[Progress] = None) -> dict:
    """Generate (or regenerate) the dataset under ``out_dir``.

    Writes ``out_dir/{train,val}/NNNNNN.png``, ``out_dir/annotations/instances_{train,val}.json``
    (COCO; ``file_name`` is relative to the split folder; ids start at 1) and, last,
    ``out_dir/meta.json`` with the parameters, so an interrupted run is never
    mistaken for a complete one by :func:`is_complete`.

    ``min_objects``, ``classes`` and ``backgrounds``: see ``shapes_render.render_image``.
    ``progress(split, done, total)`` is called after each image if given.
    Returns ``{"train": path_to_json, "val": path_to_json}`` (strings).
    """
    params = _normalize_params(num_train=num_train, num_val=num_val, image_size=image_size,
                               min_size=min_size, max_size=max_size, max_objects=max_objects, seed=seed,
                               min_objects=min_objects, classes=classes, backgrounds=backgrounds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta_path.unlink(missing_ok=True)  # dataset is incomplete until we finish

    paths = {}
    for split_index, split in enumerate(SPLITS):
        num = params[f"num_{split}"]
        paths[split] = str(_generate_split(out, split, split_index, num, params, progress))

    with open(meta_path, "w", encoding="utf-8") as f:
        json.dump(params, f, indent=2)
    return paths


def is_complete(out_dir: Union[str, os.PathLike], **params) -> bool:
    """True if ``out_dir`` holds a finished dataset generated with exactly these parameters.

    ``params`` are :func:`generate_shapes_dataset` keyword arguments; omitted ones take
    their defaults. Checks meta.json, both annotation files and the PNG counts.
    """
    out = Path(out_dir)
    want = _normalize_params(**params)
    try:
        with open(out / "meta.json", encoding="utf-8") as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    if have != want:
        return False
    for split in SPLITS:
        if not (out / "annotations" / f"instances_{split}.json").is_file():
            return False
        if sum(1 for p in (out / split).glob("*.png") if _OWN_PNG.fullmatch(p.name)) != want[f"num_{split}"]:
            return False
    return True
