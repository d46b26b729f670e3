#!/usr/bin/env python
"""Images side by side in a grid, row by row, each scaled to the first one's size: how the docs'
picture of a run's first validation images is made.

Usage (from the repo root):
    python scripts/picture_grid.py runs/shapes_R18/vis/{1,2,3,4}.png --columns 4 \
        --out docs/demo_first_four.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image


def grid(paths: list[Path], columns: int, gap: int = 4) -> Image.Image:
    """The images at `paths`, `columns` per row, `gap` white pixels between them."""
    images = [Image.open(p).convert("RGB") for p in paths]
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap),
                      "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        sheet.paste(image.resize((width, height)), (column * (width + gap), row * (height + gap)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--columns", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        print(f"error: not a file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.columns < 1:
        print("error: --columns must be at least 1", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid(args.images, args.columns).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
