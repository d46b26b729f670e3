"""Image kinds as users have them decode to the same upright RGB picture, with the size readers record."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from retinanet.data import CocoDetection
from retinanet.data.images import decode_rgb, image_size
from retinanet.errors import DataError

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


def _coco(folder, files, sizes) -> dict:
    """A COCO document with one box on the mark of each file, in the upright picture."""
    x0, y0, x1, y1 = MARK_BOX
    return {"images": [{"id": i + 1, "file_name": f.name, "height": h, "width": w}
                       for i, (f, (h, w)) in enumerate(zip(files, sizes))],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)}
                            for i in range(len(files))],
            "categories": [{"id": 1, "name": "mark"}]}


def test_dataset_reads_every_kind_with_its_box(tmp_path):
    files, expected = zip(*(write(kind, tmp_path) for kind in KINDS))
    dataset = CocoDetection(tmp_path, tmp_path / "a.json",
                            dataset=_coco(tmp_path, files, [image_size(f) for f in files]))
    for index, truth in enumerate(expected):
        sample = dataset[index]
        assert sample["image"].shape == (HEIGHT, WIDTH, 3)
        x0, y0, x1, y1 = sample["boxes"][0].astype(int)
        mark = sample["image"][y0:y1, x0:x1].astype(int)
        # the box covers the mark: its pixels are nearer the mark's colour (as this kind stores
        # it: grey for the grey file) than the background's
        mark_colour, background = truth[y0, x0].astype(int), truth[0, 0].astype(int)
        assert (np.abs(mark - mark_colour).sum(-1) < np.abs(mark - background).sum(-1)).all()


def test_json_size_of_the_stored_pixels_is_an_error(tmp_path, caplog):
    """An EXIF-rotated JPEG listed with its stored (sideways) size: training on it would put the
    boxes in the wrong place, so it is refused, naming the file and both sizes."""
    path, _ = write("exif_rotated.jpg", tmp_path)
    document = _coco(tmp_path, [path], [(WIDTH, HEIGHT)])  # stored pixels: 48 wide, 64 high
    with pytest.raises(DataError, match=r"exif_rotated\.jpg .*64x48 upright .* json says 48x64"):
        CocoDetection(tmp_path, tmp_path / "a.json", dataset=document)[0]
    skipping = CocoDetection(tmp_path, tmp_path / "a.json", dataset=document, skip_bad_images=True,
                             replace_bad_images=False)
    assert skipping[0] == {"image_id": 1, "unreadable": str(path)}
    assert "json says 48x64" in caplog.text


def test_truncated_jpeg_is_unreadable(tmp_path):
    """libjpeg decodes a JPEG cut short (grey where data is missing) with only a warning: the
    loader must see it as unreadable, as the dataset checker does."""
    path, _ = write("exif_rotated.jpg", tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:-40])  # the end of the scan and its end marker
    assert cv2.imread(str(tmp_path / "cut.jpg")) is not None  # what the check guards against
    assert decode_rgb(tmp_path / "cut.jpg") is None and decode_rgb(path) is not None


def test_inference_reads_every_kind_upright(tmp_path):
    """tools/infer.py's path (infer_files) on one file of each kind: every file is read and
    predicted on, at the upright size a viewer shows (the sizes the json records)."""
    from retinanet import Detector
    from retinanet.inference import infer_files

    folder = tmp_path / "kinds"
    folder.mkdir()
    files = [write(kind, folder)[0] for kind in KINDS]
    config = Path(__file__).resolve().parents[1] / "configs" / "shapes_R18.yaml"
    detector = Detector.from_config(config, overrides=["model.num_classes=5"], device="cpu")  # random weights
    summary = infer_files(detector, files, folder, tmp_path / "out", draw=False, log=lambda _: None)
    assert summary.num_images == len(KINDS) and not summary.skipped
    sizes = {Path(i["file_name"]).name: (i["height"], i["width"]) for i in summary.document["images"]}
    assert sizes == {f.name: (HEIGHT, WIDTH) for f in files}
