"""Running a Detector over a video: the frame loop behind `tools/infer.py --input clip.mp4`.

    summary = infer_video(detector, "clip.mp4", "out/", score_thresh=0.3)

Frames are read with OpenCV's VideoCapture, detected in batches, drawn as `infer_files` draws
images (`visualize.draw_detections`) and written with OpenCV's VideoWriter to
output_dir/<stem>.mp4 (mp4v, the input's frame rate); output_dir/detections.json is the COCO
document of `inference.infer_files` with one "images" entry per frame (id = frame index from 0,
file_name "<video name>#<frame index>", frame_index, time_s, width, height) and "info.video".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
from tqdm import tqdm

from .errors import ConfigError, DataError, MissingFileError
from .inference import (InferenceSummary, check_output_dir, coco_categories, detections_document,
                        document_info, keep_detections, model_categories)
from .visualize import draw_detections

# What tools/infer.py treats as a video (lower-case suffixes OpenCV's FFmpeg backend reads).
VIDEO_SUFFIXES = (".avi", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".webm", ".wmv")
DEFAULT_FPS = 25.0  # when the container states none


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def infer_video(detector, path: str | Path, output_dir: str | Path, *, score_thresh: float = 0.3,
                batch_size: int = 1, slice=None, progress: bool = True,
                log: Callable[[str], None] = print) -> InferenceSummary:
    """Runs `detector` (a retinanet.Detector) on every frame of the video at `path`, `batch_size`
    frames per pass (`slice`: sliced inference, as Detector.predict takes it); writes the drawn
    video and detections.json (module docstring). `progress`: a tqdm bar on stderr.
    MissingFileError / DataError naming the file when it is missing or OpenCV cannot read it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"video not found: {path}")
    output_dir = check_output_dir(output_dir)
    target = output_dir / f"{path.stem}.mp4"
    if target.resolve() == path.resolve():
        raise ConfigError(f"output {target} would overwrite the input video; choose another --output")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError(f"cannot read video {path} (not a video, or a codec OpenCV lacks)")
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    stated = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # from the container: may be off or 0
    output_dir.mkdir(parents=True, exist_ok=True)
    cat_names = model_categories(detector)
    summary = InferenceSummary(kept_per_class={name: 0 for name in cat_names.values()})
    images, annotations = [], []
    writer = None
    bar = tqdm(total=stated or None, unit="frame", desc=path.name, disable=not progress, leave=False)
    try:
        while True:
            frames = _read_frames(capture, batch_size)
            if not frames:
                break
            outputs = detector.predict(frames, slice=slice)
            for frame, out in zip(frames, outputs):
                index = summary.num_images
                file_name = f"{path.name}#{index}"
                images.append({"id": index, "file_name": file_name, "frame_index": index,
                               "time_s": round(index / fps, 4), "width": int(frame.shape[1]),
                               "height": int(frame.shape[0])})
                keep, entries = keep_detections(summary, out, score_thresh, image_id=index,
                                                file_name=file_name, cat_names=cat_names,
                                                first_id=len(annotations) + 1)
                annotations += entries
                drawn = np.asarray(draw_detections(frame, out["boxes"].numpy()[keep],
                                                   out["labels"].numpy()[keep].tolist(),
                                                   out["scores"].numpy()[keep].tolist(), detector.class_names))
                # the writer takes the drawn size: draw_detections enlarges frames under 342 px
                writer = writer or _open_writer(target, fps, drawn.shape[1], drawn.shape[0])
                writer.write(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
                summary.num_images += 1
            bar.update(len(frames))
    finally:
        bar.close()
        capture.release()
        if writer is not None:
            writer.release()
    if summary.num_images == 0:
        raise DataError(f"video {path} has no frame OpenCV can decode")
    info = document_info(detector, score_thresh, video=str(path.absolute()), fps=fps,
                         visualization=target.name)
    summary.document = detections_document(images, annotations, coco_categories(cat_names), info)
    (output_dir / "detections.json").write_text(json.dumps(summary.document))
    return summary


def _read_frames(capture: cv2.VideoCapture, count: int) -> list[np.ndarray]:
    """Up to `count` next frames as RGB uint8 (H, W, 3); fewer at the end of the video."""
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    return frames


def _open_writer(target: Path, fps: float, width: int, height: int) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise DataError(f"OpenCV cannot write {target} (no mp4v encoder in this OpenCV build)")
    return writer
