"""retinanet/video.py: a video in, the drawn video and per-frame detections out."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from retinanet import Detector
from retinanet.errors import DataError, MissingFileError
from retinanet.slicing import Slicing
from retinanet.video import infer_video, is_video

from conftest import REPO_ROOT, tiny_overrides

MAX_DETS = 5


def make_clip(path, frames: list[np.ndarray], fps: float = 10.0) -> None:
    """RGB uint8 frames -> an mp4v video at `path`, written with OpenCV as a user's clip would be."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def count_frames(path) -> tuple[int, tuple[int, int]]:
    """(frames decoded, (height, width)) of a video, by reading it through."""
    capture = cv2.VideoCapture(str(path))
    count, size = 0, None
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        count, size = count + 1, frame.shape[:2]
    capture.release()
    return count, size


@pytest.fixture(scope="module")
def detector(shapes_dir, tmp_path_factory):
    overrides = tiny_overrides(shapes_dir, tmp_path_factory.mktemp("run")) + [
        "model.postprocess.score_thresh=0.0", f"model.postprocess.max_detections={MAX_DETS}"]
    torch.manual_seed(0)
    return Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides)


@pytest.fixture(scope="module")
def clip(shapes_dir, tmp_path_factory):
    """7 frames of 96 x 128 cut from the shapes images."""
    files = sorted((shapes_dir / "val").glob("*.png"))[:7]
    frames = [np.asarray(Image.open(f).convert("RGB"))[:96] for f in files]
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    make_clip(path, frames)
    assert count_frames(path) == (7, (96, 128))
    return path


@pytest.mark.parametrize("batch_size,slicing", [(1, None), (3, Slicing(64, 64, overlap=0.25))],
                         ids=["batch1", "batch3_sliced"])
def test_video_in_video_out_with_the_same_frame_count(detector, clip, tmp_path, batch_size, slicing):
    summary = infer_video(detector, clip, tmp_path / "out", score_thresh=0.0, batch_size=batch_size,
                          slice=slicing, progress=False)
    frames, size = count_frames(tmp_path / "out" / "clip.mp4")
    assert frames == 7 == summary.num_images
    assert size == (384, 512)  # draw_detections enlarges small frames 4x, as in infer's images
    doc = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert doc == summary.document
    assert [im["frame_index"] for im in doc["images"]] == [im["id"] for im in doc["images"]] == list(range(7))
    assert [im["time_s"] for im in doc["images"]] == pytest.approx([i / 10 for i in range(7)])
    assert all((im["width"], im["height"]) == (128, 96) for im in doc["images"])
    assert doc["info"]["fps"] == pytest.approx(10.0) and doc["info"]["visualization"] == "clip.mp4"
    per_frame = np.bincount([a["image_id"] for a in doc["annotations"]], minlength=7)
    assert per_frame.tolist() == [MAX_DETS] * 7  # score_thresh 0: every frame has its maximum
    assert [a["id"] for a in doc["annotations"]] == list(range(1, 7 * MAX_DETS + 1))
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["file_name"] == f"clip.mp4#{a['image_id']}"
        assert 0 <= x and 0 <= y and x + w <= 128 + 1e-6 and y + h <= 96 + 1e-6


def test_frames_are_detected_as_the_images_they_are(detector, clip, tmp_path):
    """The per-frame json holds Detector.predict's detections of the decoded frames."""
    summary = infer_video(detector, clip, tmp_path / "out", score_thresh=0.0, progress=False)
    capture = cv2.VideoCapture(str(clip))
    ok, frame = capture.read()
    capture.release()
    assert ok
    expected = detector.predict([cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)])[0]
    first = [a for a in summary.document["annotations"] if a["image_id"] == 0]
    assert [a["score"] for a in first] == [round(float(s), 4) for s in expected["scores"]]


def test_unreadable_or_missing_video_is_a_user_error(detector, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(DataError, match="bad.mp4"):
        infer_video(detector, bad, tmp_path / "out", progress=False)
    with pytest.raises(MissingFileError, match="missing.mp4"):
        infer_video(detector, tmp_path / "missing.mp4", tmp_path / "out", progress=False)
    assert is_video("a/B.MP4") and is_video("x.avi") and not is_video("x.png")
