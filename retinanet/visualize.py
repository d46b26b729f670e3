"""Drawing detections on images (for the demo output and inspection)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def draw_detections(image: np.ndarray, boxes: np.ndarray, labels: Sequence[int],
                    scores: Sequence[float] | None, class_names: Sequence[str],
                    gt_boxes: np.ndarray | None = None) -> Image.Image:
    """image (H, W, 3) uint8 RGB; boxes (N, 4) xyxy pixels -> PIL image with labelled boxes.
    Ground-truth boxes, when given, are drawn thin in white under the detections."""
    canvas = Image.fromarray(image).convert("RGB")
    scale = max(1, int(round(512 / max(canvas.size))))  # small images are enlarged to be readable
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for box in (gt_boxes if gt_boxes is not None else []):
        draw.rectangle([v * scale for v in box], outline=(255, 255, 255), width=1)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        color = _PALETTE[int(label) % len(_PALETTE)]
        draw.rectangle([v * scale for v in box], outline=color, width=2)
        text = class_names[int(label)] + (f" {scores[i]:.2f}" if scores is not None else "")
        x, y = box[0] * scale, max(0, box[1] * scale - 11)
        draw.rectangle([x, y, x + 6 * len(text) + 2, y + 11], fill=color)
        draw.text((x + 1, y), text, fill=(0, 0, 0))
    return canvas


def save_detections(path: str | Path, *args, **kwargs) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    draw_detections(*args, **kwargs).save(path)
