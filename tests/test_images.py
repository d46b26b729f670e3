"""Image kinds as users have them decode to the same upright RGB picture, with the size readers record."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from retinanet.data.images import decode_rgb, image_size

BACKGROUND, MARK = (20, 40, 200), (220, 30, 10)  # far apart in every channel and in grey
HEIGHT, WIDTH = 48, 64
MARK_BOX = (8, 16, 40, 32)  # x0, y0, x1, y1: an 8-aligned block, so JPEG keeps it flat


def picture() -> np.ndarray:
    rgb = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    rgb[...] = BACKGROUND
    x0, y0, x1, y1 = MARK_BOX
    rgb[y0:y1, x0:x1] = MARK
    return rgb


def write(kind: str, folder) -> tuple:
    """Writes picture() as `kind` -> (path, the RGB array a correct decoder returns)."""
    rgb = picture()
    if kind == "rgb.png":
        Image.fromarray(rgb).save(path := folder / kind)
    elif kind == "grey.png":
        Image.fromarray(rgb).convert("L").save(path := folder / kind)
        grey = np.asarray(Image.fromarray(rgb).convert("L"))
        rgb = np.repeat(grey[..., None], 3, axis=2)
    elif kind == "rgba.png":
        Image.fromarray(rgb).convert("RGBA").save(path := folder / kind)
    elif kind == "palette.png":
        Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(path := folder / kind)
    elif kind in ("16bit.png", "16bit.tif"):
        # 257 * v maps 0..255 onto 0..65535 exactly; 8-bit decoding gives v back
        cv2.imwrite(str(path := folder / kind), rgb[..., ::-1].astype(np.uint16) * 257)
    elif kind == "cmyk.jpg":
        Image.fromarray(rgb).convert("CMYK").save(path := folder / kind, quality=95)
    elif kind == "exif_rotated.jpg":
        # pixels stored turned a quarter anticlockwise; orientation 6 tells viewers to turn them back
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb))).save(path := folder / kind, exif=exif,
                                                                  quality=95)
    else:
        raise ValueError(kind)
    return path, rgb


KINDS = ["rgb.png", "grey.png", "rgba.png", "palette.png", "16bit.png", "16bit.tif", "cmyk.jpg",
         "exif_rotated.jpg"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_decodes_upright_rgb(kind, tmp_path):
    path, expected = write(kind, tmp_path)
    image = decode_rgb(path)
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
    assert image_size(path) == (HEIGHT, WIDTH)
    if kind.endswith(".jpg"):
        # lossy: each pixel must be nearer its own colour than the other one (which is >= 160
        # levels away in some channel), i.e. the mark is where it should be, in the right colours
        x0, y0, x1, y1 = MARK_BOX
        inside = np.zeros((HEIGHT, WIDTH), bool)
        inside[y0:y1, x0:x1] = True
        to_mark = np.abs(image.astype(int) - MARK).sum(-1)
        to_background = np.abs(image.astype(int) - BACKGROUND).sum(-1)
        assert ((to_mark < to_background) == inside).all()
    else:
        np.testing.assert_array_equal(image, expected)  # lossless: exact


def test_unreadable_files_are_none_and_size_raises(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("text.jpg", "empty.png", "missing.png"):
        assert decode_rgb(tmp_path / name) is None
    with pytest.raises(OSError):
        image_size(tmp_path / "text.jpg")
