"""Write a Pascal VOC, YOLO or COCO dataset as a COCO instances json:

    python tools/convert_dataset.py --images DIR --annotations PATH --output out.json
                                    [--format auto|coco|voc|yolo] [--classes NAME ...]
    python tools/convert_dataset.py --images DIR --annotations PATH --output FOLDER
                                    --val-fraction 0.2 [--seed 0]

The json's file_name values are relative to --images (use that folder as data.<split>.images).
--annotations and --classes mean what data.<split>.annotations and data.classes mean (layouts:
docs/your-data.md). With --val-fraction the images are split into FOLDER/train.json and
FOLDER/val.json, the same way on every run for the same files and --seed. A problem in the
annotations stops with its file and line (exit 2); tools/check_dataset.py lists them all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import dataset_arguments, run_cli  # noqa: E402
from retinanet.errors import ConfigError, MissingFileError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(parser)
    parser.add_argument("--output", required=True,
                        help="the json to write; with --val-fraction the folder for train.json and val.json")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="split the images: this fraction (0..1) goes to val.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction split (default 0)")
    args = parser.parse_args()
    if not Path(args.annotations).exists():
        raise MissingFileError(f"annotation file not found: {args.annotations} (check --annotations)")
    if not Path(args.images).is_dir():
        raise MissingFileError(f"image folder not found: {args.images} (check --images)")
    output = Path(args.output)
    if args.val_fraction is not None and output.suffix == ".json":
        raise ConfigError(f"--output {output}: with --val-fraction it names the folder for "
                          "train.json and val.json")
    # Imported only now: retinanet.data imports torch (seconds); a usage error should be instant.
    from retinanet.data.formats import coco_json, load_dataset, read_dataset, split_dataset

    dataset = load_dataset(args.images, args.annotations, args.format, args.classes)
    if dataset is None:  # a COCO json: read as it is
        dataset = read_dataset(args.images, args.annotations, "coco")[0]
    parts = {output: dataset} if args.val_fraction is None else \
        dict(zip((output / "train.json", output / "val.json"),
                 split_dataset(dataset, args.val_fraction, args.seed)))
    for path, part in parts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(coco_json(part)))
        print(f"wrote {path}: {len(part['images'])} images, {len(part['annotations'])} annotations, "
              f"{len(part['categories'])} categories ({', '.join(c['name'] for c in part['categories'])})")
    print(f"file_name values are relative to {args.images}")
    return 0


if __name__ == "__main__":
    run_cli(main)
