#!/usr/bin/env python
"""Generate the built-in synthetic "shapes" detection dataset (COCO format).

Usage (from the repo root, no install needed):
    python scripts/make_shapes.py --out data/shapes [--num-train 2000] [--num-val 200]
                                  [--size 128 | --size 96x160] [--seed 0] [--force]
                                  [--min-size 8] [--max-size 64] [--min-objects 1] [--max-objects 6]
                                  [--classes circle square ...] [--backgrounds solid noise ...]

Other classes than the five defaults (circle square triangle star cross), for example:
    python scripts/make_shapes.py --out data/shapes_other --size 192 \
        --classes circle diamond hexagon triangle cross ell

Large images with many small objects, for example (sliced inference, docs/inference.md):
    python scripts/make_shapes.py --out data/shapes_large --num-train 0 --num-val 50 \
        --size 1024 --min-size 8 --max-size 24 --min-objects 20 --max-objects 60

Writes <out>/{train,val}/*.png, <out>/annotations/instances_{train,val}.json and
<out>/meta.json. If a complete dataset with the same parameters already exists it is
left untouched (pass --force to regenerate). Output is deterministic in the arguments.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import time  # noqa: E402

from retinanet.data.shapes import (BACKGROUNDS, CLASS_NAMES, SHAPE_NAMES, generate_shapes_dataset,  # noqa: E402
                                   is_complete)

PROGRESS_EVERY = 500


def parse_size(text: str):
    """'128' -> 128 (square); '96x160' -> (96, 160) as (height, width)."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return tuple(values)
    raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory, e.g. data/shapes")
    p.add_argument("--num-train", type=int, default=2000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--size", type=parse_size, default=128, help="N (square) or HxW")
    p.add_argument("--min-size", type=float, default=8, help="smallest object side, px")
    p.add_argument("--max-size", type=float, default=64, help="largest object side, px")
    p.add_argument("--min-objects", type=int, default=1, help="fewest objects in a non-empty image")
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--classes", nargs="+", default=list(CLASS_NAMES), choices=SHAPE_NAMES, metavar="NAME",
                   help=f"shapes to draw, ids 1..k in this order, from: {' '.join(SHAPE_NAMES)} "
                        f"(default: {' '.join(CLASS_NAMES)})")
    p.add_argument("--backgrounds", nargs="+", default=list(BACKGROUNDS), choices=BACKGROUNDS,
                   metavar="STYLE", help=f"background styles (default: {' '.join(BACKGROUNDS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="regenerate even if complete")
    return p


def print_progress(split: str, done: int, total: int) -> None:
    if done % PROGRESS_EVERY == 0 or done == total:
        print(f"  [{split}] {done}/{total} images", flush=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    params = dict(
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=args.size,
        min_size=args.min_size,
        max_size=args.max_size,
        max_objects=args.max_objects,
        seed=args.seed,
        min_objects=args.min_objects,
        classes=args.classes,
        backgrounds=args.backgrounds,
    )
    if not args.force and is_complete(args.out, **params):
        print(f"Shapes dataset already complete at {args.out} (same parameters); "
              f"skipping generation (use --force to regenerate).")
        return 0

    print(f"Generating shapes dataset at {args.out}: {params}", flush=True)
    start = time.perf_counter()
    paths = generate_shapes_dataset(args.out, progress=print_progress, **params)
    elapsed = time.perf_counter() - start
    print(f"Done in {elapsed:.1f} s.")
    for split, path in paths.items():
        print(f"  {split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
