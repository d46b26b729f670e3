"""Image files as users have them -> RGB uint8, the same way for training, evaluation and inference.

OpenCV decodes every kind the tests generate: 8-bit colour, greyscale, RGBA and palette PNG
(alpha dropped, palette expanded), 16-bit PNG and TIFF (scaled to 8 bits), CMYK JPEG, and JPEG
with an EXIF orientation (applied, so the array is the upright picture a viewer shows).
Annotations refer to that upright picture, so its size is what `image_size` reports and what the
dataset readers write as an image's width and height.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# Image files taken from a folder or a glob (inference) and listed by the VOC and YOLO readers,
# compared lower-case: ultralytics' image formats that OpenCV decodes.
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# EXIF orientations 5..8 turn the stored pixels by 90 degrees: width and height swap.
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}


def decode_rgb(path: str | Path) -> np.ndarray | None:
    """An image file -> upright RGB uint8 (H, W, 3), or None when it is missing, truncated or
    cannot be decoded."""
    path = Path(path)
    if not path.is_file() or jpeg_truncated(path):
        return None
    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR)
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def jpeg_truncated(path: Path) -> bool:
    """True for a JPEG (by its magic bytes) without the end-of-image marker near its end: libjpeg
    fills the missing part with grey and only warns, so cv2 would return a damaged picture."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 1024))  # some writers pad after the marker
        return b"\xff\xd9" not in f.read()


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the upright picture, read from the file's header (no pixel decoding).
    Raises OSError (PIL's UnidentifiedImageError included) when the file is not an image."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (width, height) if orientation in _SWAPS_SIDES else (height, width)
