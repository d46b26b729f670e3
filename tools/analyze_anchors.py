"""How well a config's anchors cover its dataset's boxes:

    python tools/analyze_anchors.py --config configs/X.yaml [--split train|val] [--max-images N]
                                    [--target 0.9] [--json FILE] [--format auto|coco|voc|yolo]
                                    [key=value ...]

A box is covered when its best anchor has IoU >= model.matcher.fg_iou. Boxes are measured in the
resized image, as the model sees them: scale = min(min_size / shorter side, max_size / longer
side), with the first data.min_size and data.max_size for train (multi-scale training draws
others; flips and colour jitter are left out), data.test_min_size / data.test_max_size for val,
sides rounded (train) or floored (val) as the transforms do; each image padded alone to
data.size_divisibility. Prints coverage and median best IoU for all boxes, per COCO size
bucket (small < 32^2, medium < 96^2, large) and per pyramid level (the level of each box's best
anchor). When a bucket is below --target, scores variations of the anchors (base sizes x 0.5 to
x 2, 3 or 4 octave scales, aspect ratios from the boxes' own quantiles) on the same boxes and
prints the best as config overrides. The dataset may be in any format data.<split>.format reads
(--format overrides it). Exit code 2: bad config, dataset path or annotations.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, positive_int, run_cli  # noqa: E402
from retinanet.errors import ConfigError, MissingFileError  # noqa: E402


def main() -> int:
    parser = config_parser(__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--split", choices=["train", "val"], default="train",
                        help="which dataset of the config (default train: the boxes matching trains on)")
    parser.add_argument("--max-images", type=positive_int, default=None,
                        help="analyse N images evenly spread over the split (default: all)")
    parser.add_argument("--target", type=float, default=0.9,
                        help="coverage a size bucket should reach; below it a suggestion is searched")
    parser.add_argument("--json", default=None, help="also write the numbers to this json file")
    parser.add_argument("--format", choices=["auto", "coco", "voc", "yolo"], default=None,
                        help="dataset format (default: data.<split>.format of the config)")
    args = parser.parse_args()
    from retinanet.config import load_config

    config = load_config(args.config, args.overrides)
    data, anchors_cfg = config.data, config.model.anchors
    split = data.train if args.split == "train" else data.val
    key = f"data.{args.split}"
    if not split.images or not split.annotations:
        raise ConfigError(f"{key}.images and {key}.annotations must be set in the config")
    # Checked before importing torch (seconds): a wrong path should fail at once.
    if not Path(split.annotations).exists():
        raise MissingFileError(f"annotation file not found: {split.annotations} ({key}.annotations)")
    if not Path(split.images).is_dir():
        raise MissingFileError(f"image folder not found: {split.images} ({key}.images)")
    import torch

    from retinanet import analysis
    from retinanet.data import CocoDetection, load_dataset

    coco = load_dataset(split.images, split.annotations, args.format or split.format, data.classes)
    dataset = CocoDetection(split.images, split.annotations, label_map=data.label_map,
                            skip_bad_images=data.skip_bad_images, dataset=coco)
    dataset.report_dropped()  # degenerate boxes are left out, as in training: say how many
    image_ids = dataset.image_ids
    if args.max_images and args.max_images < len(image_ids):
        step = len(image_ids) / args.max_images
        image_ids = [image_ids[int(i * step)] for i in range(args.max_images)]
    min_size, max_size = (data.min_size[0], data.max_size) if args.split == "train" else \
        (data.test_min_size, data.test_max_size)
    images = ((dataset.coco.imgs[i]["height"], dataset.coco.imgs[i]["width"],
               torch.from_numpy(dataset.targets(i)[0])) for i in image_ids)
    resized = analysis.resize_dataset_boxes(
        images, min_size=min_size, max_size=max_size, size_divisibility=data.size_divisibility,
        train=args.split == "train")
    fg_iou = config.model.matcher.fg_iou

    # The model's own generator (the same arguments as build_model gives it).
    from retinanet.model import build_anchor_generator
    generator = build_anchor_generator(anchors_cfg)
    summary = analysis.dataset_coverage(generator, resized, fg_iou)
    anchors_text = (f"level sizes {anchors_cfg.level_sizes}" if anchors_cfg.level_sizes else
                    f"sizes {anchors_cfg.sizes} x octave scales "
                    f"{[round(s, 3) for s in anchors_cfg.octave_scales]}") + \
        f" x aspect ratios {anchors_cfg.aspect_ratios} ({generator.num_anchors} per location)"
    print(f"{key}: {split.annotations}: {resized.num_images} of {len(dataset)} images, "
          f"{summary['all']['num_boxes']} boxes, resized with min_size {min_size} / max_size {max_size}")
    print(f"anchors: {anchors_text}, offset {anchors_cfg.offset}")
    print(f"a box is covered when its best anchor has IoU >= {fg_iou} (model.matcher.fg_iou)\n")
    print(analysis.format_coverage(summary))

    low = {name: s["coverage"] for name, s in summary["buckets"].items()
           if s["coverage"] is not None and s["coverage"] < args.target}
    report = {"config": str(args.config), "split": args.split, "num_images": resized.num_images,
              "min_size": min_size, "max_size": max_size, "fg_iou": fg_iou, "target": args.target,
              "anchors": {"sizes": anchors_cfg.sizes, "octave_scales": anchors_cfg.octave_scales,
                          "aspect_ratios": anchors_cfg.aspect_ratios, "level_sizes": anchors_cfg.level_sizes},
              "coverage": summary, "candidates": [], "suggestion": None}
    if summary["all"]["num_boxes"] == 0:
        print("\nno boxes in these images: nothing to cover")
    elif not low:
        print(f"\nevery size bucket with boxes is at least {100 * args.target:.0f}% covered: "
              "no change suggested")
    else:
        print("\nbelow the target of {:.0f}%: {}".format(
            100 * args.target, ", ".join(f"{n} ({100 * c:.1f}%)" for n, c in low.items())))
        current = analysis.AnchorSetting(tuple(anchors_cfg.sizes), tuple(anchors_cfg.octave_scales),
                                         tuple(anchors_cfg.aspect_ratios))
        ranked = analysis.search_anchor_settings(
            current, resized, fg_iou, target=args.target, strides=anchors_cfg.strides,
            offset=anchors_cfg.offset, round_base=anchors_cfg.round_base,
            stride_from_image=anchors_cfg.torchvision_strides)
        best, best_summary = ranked[0]
        overrides = best.overrides() + (["model.anchors.level_sizes=null"] if anchors_cfg.level_sizes else [])
        print(f"best of {len(ranked)} candidate anchor settings, scored on the same boxes "
              f"(per loc: anchors per location):")
        print(analysis.format_candidates(ranked))
        if best == current and not anchors_cfg.level_sizes:
            print("\nno candidate covers more than the current anchors")
        else:
            print(f"\nsuggested (coverage {100 * best_summary['all']['coverage']:.1f}% of all boxes; "
                  f"changing anchors means training again):\n  " + " ".join(overrides))
        report["candidates"] = [{"sizes": list(s.sizes), "octave_scales": list(s.octave_scales),
                                 "aspect_ratios": list(s.aspect_ratios),
                                 "anchors_per_location": s.anchors_per_location, "coverage": c}
                                for s, c in ranked[:10]]
        if best != current or anchors_cfg.level_sizes:
            report["suggestion"] = {**report["candidates"][0], "overrides": overrides}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
