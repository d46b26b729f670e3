"""Evaluate weights with COCO mAP:

    python tools/eval.py --weights W.pth [--config configs/X.yaml] [--output DIR] \\
        [--slice H W [--overlap 0.25]] [--tta] [key=value ...]

A trainer checkpoint carries its config (validation split, model, postprocessing), class names and
category ids, so --config is only needed for a bare state dict; key=value overrides apply to
either, e.g. data.val.images=... data.val.annotations=... to score another split. The split must
name the classes the model predicts, in the same order.

Prints the 12-number COCO summary and per-class AP; writes coco_results.json and metrics.json to
--output (default: <output_dir>/eval with --config, else eval/ beside the weights) and a few
images with drawn detections to <output>/vis.

--slice H W evaluates sliced inference (Detector.predict(..., slice=...), retinanet/slicing.py):
each image is read again at full size for its tiles (the loader's resized copy serves only the
whole-image pass), so it costs the tiles' forward passes and a second decoding per image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, run_cli, view_arguments, view_overrides  # noqa: E402


def main() -> int:
    parser = config_parser(__doc__, config_required=False)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--weights", required=True, help="checkpoint (.pth); a bare state dict needs --config")
    parser.add_argument("--output", default=None,
                        help="folder for results (default <output_dir>/eval, or eval/ beside the weights)")
    view_arguments(parser)
    args = parser.parse_args()
    args.overrides = view_overrides(args)
    from retinanet.data import build_dataset
    from retinanet.detector import check_same_classes, load_detector
    from retinanet.engine.validation import build_evaluator, write_visualizations
    from retinanet.slicing import Slicing

    slicing = Slicing(*args.slice, overlap=args.overlap) if args.slice else None

    detector = load_detector(args.weights, args.config, args.overrides)
    config = detector.config
    dataset = build_dataset(config.data, train=False)
    check_same_classes(detector.class_names, args.weights, dataset.class_names, dataset.annotations_file)
    default = Path(config.output_dir) if args.config else Path(args.weights).parent
    output = Path(args.output or default / "eval")
    evaluator = build_evaluator(config, dataset, output_dir=output, progress=sys.stderr.isatty())
    predict = detector.predict_batch
    if slicing is not None:
        def predict(batch):  # tiles need the full-size image, which the loader has resized
            return detector.predict([dataset.read_image(i) for i in batch.image_ids], slice=slicing)
    result = evaluator(predict)
    write_visualizations(dataset, result["predictions"], output / "vis", config.eval.num_vis_images,
                         config.eval.vis_score_thresh)
    print(f"wrote {output / 'coco_results.json'} and {output / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
