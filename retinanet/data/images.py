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
    """An image file -> upright RGB uint8 (H, W, 3), or None when it is missing or cannot be decoded."""
    path = Path(path)
    image = cv2.imread(os.fspath(path), cv2.IMREAD_COLOR) if path.is_file() else None
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the upright picture, read from the file's header (no pixel decoding).
    Raises OSError (PIL's UnidentifiedImageError included) when the file is not an image."""
    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return (width, height) if orientation in _SWAPS_SIDES else (height, width)
