"""retinanet/slicing.py and Detector.predict(slice=...): the tiling, the merge of a box that a tile
border cuts, and tiles fed at their native resolution."""
from __future__ import annotations

import json
import math
import runpy
import sys

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from retinanet import Detector
from retinanet.config import load_config
from retinanet.data import CocoDetection
from retinanet.errors import ConfigError
from retinanet.model import build_model
from retinanet.slicing import Slicing, Tiling, as_slicing, merge_tiles, tile_image, tile_spans

from conftest import REPO_ROOT, tiny_overrides


@pytest.mark.parametrize("length,tile,overlap", [(1024, 256, 0.25), (1000, 256, 0.2), (300, 128, 0.25),
                                                 (256, 256, 0.5), (100, 256, 0.25), (513, 128, 0.0),
                                                 (777, 100, 0.9)])
def test_tiles_cover_the_side_with_the_overlap_and_no_more_tiles(length, tile, overlap):
    spans = tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == min(tile, length) for start, end in spans)
    wanted = math.ceil(overlap * tile)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert s0 < s1 and e0 - s1 >= wanted  # neighbours share at least the overlap
    if len(spans) > 1:  # one tile fewer could not keep that overlap
        step = tile - wanted
        assert (len(spans) - 2) * step < length - tile


def test_windows_cover_every_pixel_once_or_more_in_row_order():
    tiling = tile_image(300, 700, Slicing(128, 256, overlap=0.25))
    windows = tiling.windows()
    assert len(windows) == len(tiling.ys) * len(tiling.xs)
    covered = np.zeros((300, 700), dtype=int)
    for x0, y0, x1, y1 in windows:
        assert (y1 - y0, x1 - x0) == (128, 256)
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    # row by row: the second window is the first row's second column
    assert windows[1] == (tiling.xs[1][0], 0, tiling.xs[1][1], 128)


def test_a_box_cut_by_a_tile_border_merges_into_one_detection():
    """A hand-made case: an object 90..120 px across two tiles ([0, 100) and [75, 175)); the first
    tile sees it cut at its border (90..100), the second whole. NMS alone keeps both."""
    tiling = Tiling(ys=[(0, 100)], xs=[(0, 100), (75, 175)])
    cut = {"boxes": torch.tensor([[90.0, 10.0, 100.0, 30.0]]), "scores": torch.tensor([0.9]),
           "labels": torch.tensor([2])}
    whole_in_tile = {"boxes": torch.tensor([[15.0, 10.0, 45.0, 30.0]]), "scores": torch.tensor([0.8]),
                     "labels": torch.tensor([2])}
    merged = merge_tiles([cut, whole_in_tile], tiling, None, nms_thresh=0.5, max_detections=100)
    assert merged["boxes"].tolist() == [[90.0, 10.0, 120.0, 30.0]]
    assert merged["scores"].tolist() == [pytest.approx(0.8)] and merged["labels"].tolist() == [2]
    # what the edge rule is for: the cut box overlaps the whole one too little for NMS
    both = torch.tensor([[90.0, 10.0, 100.0, 30.0], [90.0, 10.0, 120.0, 30.0]])
    assert box_iou(both[:1], both[1:]).item() < 0.5
    assert len(batched_nms(both, torch.tensor([0.9, 0.8]), torch.tensor([2, 2]), 0.5)) == 2


def test_merge_keeps_what_only_one_tile_sees_and_suppresses_per_class():
    tiling = Tiling(ys=[(0, 100)], xs=[(0, 100), (75, 175)])
    left = {"boxes": torch.tensor([[5.0, 5.0, 20.0, 20.0],     # inside the first tile only
                                   [80.0, 50.0, 95.0, 65.0],   # inside the overlap, uncut
                                   [60.0, 40.0, 100.0, 60.0]]),  # cut, but wider than the overlap
            "scores": torch.tensor([0.9, 0.7, 0.6]), "labels": torch.tensor([0, 1, 3])}
    right = {"boxes": torch.tensor([[5.0, 50.0, 20.0, 65.0],   # the same object as left's second
                                    [5.0, 50.0, 20.0, 65.0]]),  # ... and a box of another class there
             "scores": torch.tensor([0.8, 0.5]), "labels": torch.tensor([1, 4])}
    whole = {"boxes": torch.tensor([[4.0, 5.0, 20.0, 21.0]]), "scores": torch.tensor([0.3]),
             "labels": torch.tensor([0])}
    merged = merge_tiles([left, right], tiling, whole, nms_thresh=0.5, max_detections=100)
    got = sorted(zip(merged["labels"].tolist(), merged["boxes"].tolist()))
    assert got == [(0, [5.0, 5.0, 20.0, 20.0]), (1, [80.0, 50.0, 95.0, 65.0]),
                   (3, [60.0, 40.0, 100.0, 60.0]), (4, [80.0, 50.0, 95.0, 65.0])]
    assert merged["scores"].tolist() == sorted(merged["scores"].tolist(), reverse=True)
    capped = merge_tiles([left, right], tiling, whole, nms_thresh=0.5, max_detections=2)
    assert capped["scores"].tolist() == pytest.approx([0.9, 0.8])


def test_slicing_arguments():
    assert as_slicing((64, 96)) == Slicing(64, 96)
    assert as_slicing((64, 96, 0.5)).overlap == 0.5
    for bad in [(64,), (0, 64), (64, 64, 1.0), (64, 64, -0.1)]:
        with pytest.raises(ConfigError):
            as_slicing(bad)


@pytest.fixture(scope="module")
def detector(shapes_dir, tmp_path_factory):
    """The tiny demo model with random weights; evaluation size 128 (configs/shapes_R18.yaml)."""
    overrides = tiny_overrides(shapes_dir, tmp_path_factory.mktemp("run")) + [
        "model.postprocess.score_thresh=0.0", "model.postprocess.max_detections=30"]
    torch.manual_seed(0)
    return Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides)


def _bright_region_detector(detector, calls):
    """A stand-in for the network and postprocessing: per image of the batch, the box of its
    bright pixels in original pixels, score 0.9 at native resolution and 0.5 when resized."""
    def predict_batch(batch):
        calls.append((list(batch.image_sizes), list(batch.orig_sizes)))
        outputs = []
        for image, (h, w), (oh, ow) in zip(batch.images, batch.image_sizes, batch.orig_sizes):
            rows, cols = torch.nonzero(image[:, :h, :w].mean(0) > 1.5, as_tuple=True)
            if len(rows) == 0:
                outputs.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                "labels": torch.zeros(0, dtype=torch.int64)})
                continue
            box = torch.stack([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]).float()
            box = box * torch.tensor([ow / w, oh / h, ow / w, oh / h])
            outputs.append({"boxes": box[None], "scores": torch.tensor([0.9 if (h, w) == (oh, ow) else 0.5]),
                            "labels": torch.tensor([1])})
        return outputs
    return predict_batch


def test_predict_sliced_finds_a_square_across_tile_borders_once(detector, monkeypatch):
    """A white 30 px square on grey, across the border of the first two tile columns and rows
    (tiles of 128 px with 0.25 overlap start at 0, 86 and 172 on a 300 px side): one detection,
    its exact box, from a tile at native resolution; the whole image runs resized to 128."""
    image = np.full((300, 300, 3), 128, dtype=np.uint8)
    image[110:140, 120:150] = 255
    calls = []
    monkeypatch.setattr(detector, "predict_batch", _bright_region_detector(detector, calls))
    out = detector.predict([image], slice=Slicing(128, 128, overlap=0.25, batch_size=4))[0]
    assert out["boxes"].tolist() == [[120.0, 110.0, 150.0, 140.0]]
    assert out["scores"].tolist() == [pytest.approx(0.9)] and out["category_ids"].tolist() == [2]
    whole, *tiles = calls
    assert whole == ([(128, 128)], [(300, 300)])  # resized as without slicing
    sizes = [size for image_sizes, orig_sizes in tiles for size in image_sizes + orig_sizes]
    assert set(sizes) == {(128, 128)} and len(sizes) == 2 * 9  # 3 x 3 tiles, native, 4 per pass
    assert [len(image_sizes) for image_sizes, _ in tiles] == [4, 4, 1]


def test_one_tile_the_image_size_equals_evaluating_at_that_size(detector, shapes_dir, tmp_path):
    """Slicing a 256 px image into one 256 px tile without the whole-image pass gives the
    detections of a model evaluated at 256 px: the tile is fed at native resolution."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    sliced = detector.predict([image], slice=Slicing(256, 256, whole_image=False))[0]
    native = Detector(detector.model, transform=type(detector.transform)(
        min_size=256, max_size=256, mean=detector.transform.mean.flatten().tolist(),
        std=detector.transform.std.flatten().tolist()), postprocessor=detector.postprocessor,
        size_divisibility=detector.collate.size_divisibility).predict([image])[0]
    resized = detector.predict([image])[0]
    assert len(sliced["scores"]) == len(native["scores"]) == 30

    def rows(out):
        return sorted(zip(out["scores"].tolist(), out["labels"].tolist(), out["boxes"].tolist()))
    assert rows(sliced) == rows(native)
    assert rows(resized) != rows(native)  # the evaluation size, 128, is another input
    merged = detector.predict([image], slice=(256, 256))[0]  # with the whole image, still capped
    assert len(merged["scores"]) == 30
    assert (merged["boxes"] >= 0).all() and (merged["boxes"] <= 256).all()


def test_eval_tool_scores_sliced_detections(shapes_dir, tmp_path, monkeypatch, capsys):
    """tools/eval.py --slice scores Detector.predict(..., slice=...)'s detections of each image."""
    overrides = tiny_overrides(shapes_dir, tmp_path / "run") + ["model.postprocess.max_detections=20",
                                                                "model.postprocess.score_thresh=0.0"]
    config = REPO_ROOT / "configs" / "shapes_R18.yaml"
    torch.manual_seed(0)
    weights = tmp_path / "random.pth"
    torch.save(build_model(load_config(config, overrides).model, 5, load_backbone_weights=False).state_dict(),
               weights)
    detector = Detector.from_config(config, weights=weights, overrides=overrides)
    monkeypatch.setattr(sys, "argv", ["eval.py", "--config", str(config), "--weights", str(weights),
                                      "--output", str(tmp_path / "eval"), "--slice", "64", "64",
                                      "--overlap", "0.5", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "tools" / "eval.py"), run_name="__main__")
    assert exit_info.value.code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "eval" / "coco_results.json").read_text())
    dataset = CocoDetection(shapes_dir / "val", shapes_dir / "annotations" / "instances_val.json")
    image_id = dataset.image_ids[0]
    expected = detector.predict([dataset.read_image(image_id)], slice=(64, 64, 0.5))[0]
    scored = sorted((r["score"] for r in results if r["image_id"] == image_id), reverse=True)
    assert len(scored) == 20  # the json rounds scores to 5 decimals
    assert scored == sorted(round(v, 5) for v in expected["scores"].tolist())[::-1]
    assert len({r["image_id"] for r in results}) == len(dataset.image_ids)
    unsliced = detector.predict([dataset.read_image(image_id)])[0]
    assert not torch.equal(unsliced["scores"], expected["scores"])  # so the tiles were scored
