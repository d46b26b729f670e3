"""Detect objects in image files or a video and draw them:

    python tools/infer.py --weights W.pth --input IMAGE|FOLDER|'GLOB'|VIDEO --output DIR \\
        [--config configs/X.yaml] [--score 0.3] [--batch-size N] [--skip-bad] \\
        [--slice H W [--overlap 0.25]] [--tta] [key=value ...]

A trainer checkpoint carries its config, class names and category ids: --config is only needed
for a bare state dict (converted torchvision weights); key=value overrides apply to either.

Writes DIR/<image stem>.png with the detections of score >= --score drawn (boxes, class names,
scores) and DIR/detections.json: a COCO instances file ("images" with id = index in the input
order and file_name relative to the input folder, "categories", "annotations" with bbox
[x, y, w, h] rounded to 2 decimals and score), whose "annotations" list is also a COCO results
list. A folder is read without recursion; quote a glob ('photos/**/*.jpg' recurses). The model
itself keeps detections above model.postprocess.score_thresh (and at most
model.postprocess.max_detections per image); --score filters those. Exit code 2: bad config,
no matching input, or an unreadable image (named; --skip-bad skips and counts them instead).

--slice H W: sliced inference for large images with small objects: the network also runs on
H x W tiles at their native resolution, neighbours overlapping by --overlap of a tile, merged with
the whole image's detections by per-class NMS (retinanet/slicing.py).

A video file (--input clip.mp4) writes DIR/<stem>.mp4 with the detections drawn on every frame and
DIR/detections.json with one "images" entry per frame (retinanet/video.py); a progress bar on
stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, positive_int, run_cli, view_arguments, view_overrides  # noqa: E402


def main() -> int:
    parser = config_parser(__doc__, config_required=False)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--weights", required=True, help="checkpoint (.pth); a bare state dict needs --config")
    parser.add_argument("--input", required=True, help="an image file, a folder of images or a quoted glob")
    parser.add_argument("--output", required=True, help="folder for the drawn images and detections.json")
    parser.add_argument("--score", type=float, default=0.3,
                        help="keep (draw and write) detections with score >= this (default 0.3)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per forward pass (default: eval.batch_size of the config)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip unreadable images with a counted warning instead of stopping")
    view_arguments(parser)
    args = parser.parse_args()
    args.overrides = view_overrides(args)
    # Imported only now: a usage error should not wait for torch.
    from retinanet.inference import expand_inputs
    from retinanet.slicing import Slicing
    from retinanet.video import infer_video, is_video

    slicing = Slicing(*args.slice, overlap=args.overlap) if args.slice else None
    video = Path(args.input).is_file() and is_video(args.input)
    if not video:
        files, root = expand_inputs(args.input)  # before loading the model: a typo fails at once
    from retinanet.detector import load_detector
    from retinanet.inference import infer_files

    detector = load_detector(args.weights, args.config, args.overrides)
    config = detector.config
    batch_size = args.batch_size or config.eval.batch_size
    if video:
        summary = infer_video(detector, args.input, args.output, score_thresh=args.score,
                              batch_size=batch_size, slice=slicing, progress=sys.stderr.isatty())
    else:
        summary = infer_files(detector, files, root, args.output, score_thresh=args.score,
                              batch_size=batch_size, skip_bad=args.skip_bad, slice=slicing)
    output = Path(args.output)

    model_thresh = config.model.postprocess.score_thresh
    skipped = f", {len(summary.skipped)} unreadable skipped" if summary.skipped else ""
    unit = "frames" if video else "images"
    print(f"{summary.num_images} {unit}{skipped}: {summary.num_detections} detections above the "
          f"model's score_thresh {model_thresh}, {summary.num_kept} kept with score >= {args.score}")
    if summary.num_uncategorised:
        print(f"left out {summary.num_uncategorised} detections of labels that have no dataset category")
    if args.score < model_thresh:
        print(f"note: --score {args.score} is below model.postprocess.score_thresh {model_thresh}, so "
              f"nothing under {model_thresh} exists to keep; lower it with "
              f"model.postprocess.score_thresh={args.score}")
    per_class = ", ".join(f"{name} {count}" for name, count in summary.kept_per_class.items() if count)
    if per_class:
        print(f"kept per class: {per_class}")
    written = (f"{output / Path(args.input).stem}.mp4 ({summary.num_images} frames)" if video
               else f"{summary.num_images} images")
    print(f"wrote {written} and {output / 'detections.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
