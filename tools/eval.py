"""Evaluate weights with COCO mAP: python tools/eval.py --config configs/X.yaml --weights W.pth [key=value ...]

Prints the 12-number COCO summary and per-class AP; writes coco_results.json and metrics.json to
--output (default: <output_dir>/eval) and a few images with drawn detections to <output>/vis.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, run_cli  # noqa: E402


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--weights", required=True, help="checkpoint or state dict (.pth)")
    parser.add_argument("--output", default=None, help="folder for results (default <output_dir>/eval)")
    args = parser.parse_args()
    from retinanet import Detector
    from retinanet.config import load_config
    from retinanet.data import build_dataset
    from retinanet.engine.validation import build_evaluator, write_visualizations

    config = load_config(args.config, args.overrides)
    detector = Detector.from_config(config, weights=args.weights)
    dataset = build_dataset(config.data, train=False)
    output = Path(args.output or Path(config.output_dir) / "eval")
    evaluator = build_evaluator(config, dataset, output_dir=output, progress=sys.stderr.isatty())
    result = evaluator(detector.predict_batch)
    write_visualizations(dataset, result["predictions"], output / "vis", config.eval.num_vis_images,
                         config.eval.vis_score_thresh)
    print(f"wrote {output / 'coco_results.json'} and {output / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
