#!/usr/bin/env python
"""COCO AP of one model on a split of large images, with and without sliced inference; one JSON.

    python scripts/benchmark_slicing.py --weights runs/shapes_small_R18/model_final.pth \\
        --images data/shapes_large/val --annotations data/shapes_large/annotations/instances_val.json \\
        --slice 256 256 --overlap 0.25 [--output docs/benchmarks/slicing/shapes_large.json]

Rows, every one from the same run on the same machine:
- resized: the whole image resized to data.test_min_size / test_max_size (inference as without
  --slice: what tools/eval.py measures);
- native: the whole image at its own size (data.test_min_size and test_max_size set to it), the
  fully convolutional alternative to slicing when memory allows;
- sliced: tiles at native resolution plus the resized whole image, merged (tools/eval.py --slice);
- tiles_only: the tiles without the whole image (Slicing(whole_image=False)).
Each row: AP, AP50, AP75, APs, APm, seconds per image (this machine, wall clock, batch of
--batch-size images) and the number of detections scored. The JSON also records the date, the
machine, the command and the dataset's generator parameters (its meta.json) when it has them,
and prints the rows as the markdown table docs/inference.md shows. (It is written below
docs/benchmarks/, not in it: scripts/benchmark_table.py renders the files there as
scripts/benchmark.py's speed tables.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from retinanet.cli import positive_int  # noqa: E402
from retinanet.data import build_dataset  # noqa: E402
from retinanet.detector import load_detector  # noqa: E402
from retinanet.engine.validation import build_evaluator  # noqa: E402
from retinanet.slicing import Slicing  # noqa: E402

MODES = ("resized", "native", "sliced", "tiles_only")
METRICS = ("AP", "AP50", "AP75", "APs", "APm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="trainer checkpoint")
    p.add_argument("--config", default=None, help="config (default: the checkpoint's)")
    p.add_argument("--images", required=True, help="image folder of the large-image split")
    p.add_argument("--annotations", required=True, help="its COCO json")
    p.add_argument("--slice", type=positive_int, nargs=2, metavar=("H", "W"), required=True)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=positive_int, default=2, help="images per evaluation batch")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--output", default="docs/benchmarks/slicing/shapes_large.json", help="the JSON to write")
    return p


def machine() -> str:
    """The CPU's model name, its core count, the GPU if any, and torch's version and threads."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, {platform.system()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def markdown(rows: list[dict]) -> str:
    lines = ["| inference | AP | AP50 | AP75 | APs | s / image |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | {r['APs']:.3f} | "
              f"{r['seconds_per_image']:.2f} |" for r in rows]
    return "\n".join(lines)


def evaluate(args, mode: str, slicing: Slicing) -> dict:
    """One row: the mode's detector over the split, scored by the package's evaluator."""
    overrides = [f"data.val.images={args.images}", f"data.val.annotations={args.annotations}",
                 f"eval.batch_size={args.batch_size}", "data.num_workers=0"]
    if mode == "native":
        side = max(max(im["height"], im["width"]) for im in json.loads(Path(args.annotations).read_text())["images"])
        overrides += [f"data.test_min_size={side}", f"data.test_max_size={side}"]
    detector = load_detector(args.weights, args.config, overrides)
    dataset = build_dataset(detector.config.data, train=False)
    evaluator = build_evaluator(detector.config, dataset, output_dir=None)
    predict = detector.predict_batch
    if mode in ("sliced", "tiles_only"):
        spec = slicing if mode == "sliced" else Slicing(slicing.height, slicing.width, slicing.overlap,
                                                        whole_image=False)

        def predict(batch):  # tiles need the full-size image, which the loader has resized
            return detector.predict([dataset.read_image(i) for i in batch.image_ids], slice=spec)
    start = time.perf_counter()
    result = evaluator(predict, log=lambda text: None)
    seconds = time.perf_counter() - start
    row = {"mode": mode, **{name: round(float(result["metrics"][name]), 4) for name in METRICS},
           "seconds_per_image": round(seconds / len(dataset), 3),
           "num_detections": int(sum(len(d["scores"]) for d in result["predictions"].values())),
           "eval_size": [detector.config.data.test_min_size, detector.config.data.test_max_size]}
    print(f"{mode:<11} AP {row['AP']:.3f}  AP50 {row['AP50']:.3f}  APs {row['APs']:.3f}  "
          f"{row['seconds_per_image']:.2f} s/image", flush=True)
    return row


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    slicing = Slicing(*args.slice, overlap=args.overlap)
    rows = [evaluate(args, mode, slicing) for mode in args.modes]
    coco = json.loads(Path(args.annotations).read_text())
    meta_path = Path(args.annotations).parent.parent / "meta.json"
    report = {
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "command": "python scripts/benchmark_slicing.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "weights": args.weights,
        "dataset": {"images": args.images, "annotations": args.annotations, "num_images": len(coco["images"]),
                    "num_annotations": len(coco["annotations"]),
                    "generator": json.loads(meta_path.read_text()) if meta_path.is_file() else None},
        "slicing": {"height": slicing.height, "width": slicing.width, "overlap": slicing.overlap},
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
