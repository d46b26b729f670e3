"""Check a dataset (COCO, Pascal VOC or YOLO) before training:

    python tools/check_dataset.py --images DIR --annotations PATH [--no-read]
                                  [--format auto|coco|voc|yolo] [--classes NAME ...]
                                  [--skip-bad-images]

Prints one line per problem with its count, the first offending ids (for VOC and YOLO: the first
files and lines) and what training does with it (retinanet/data/policy.py): ERROR (training stops),
SKIPPED (with data.skip_bad_images: true), REPAIRED (dropped, clipped or filled in) or NOTE.
Exit code 0: nothing stops training; 1: something does; 2: usage error (a path that does not
exist, a bad argument).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import dataset_arguments, run_cli  # noqa: E402
from retinanet.errors import MissingFileError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(parser)
    parser.add_argument("--no-read", action="store_true",
                        help="only check that image files exist; do not decode them (fast on COCO train)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="judge as training with data.skip_bad_images=true does: missing, "
                             "unreadable and mis-sized images are skipped, not errors")
    args = parser.parse_args()
    # A wrong path is a usage error (exit 2), not a finding about the dataset.
    annotations, images = Path(args.annotations), Path(args.images)
    if not annotations.exists():
        raise MissingFileError(f"annotation file not found: {annotations} (check --annotations)")
    if not images.is_dir():
        raise MissingFileError(f"image folder not found: {images} (check --images)")
    # Imported only now: retinanet.data imports torch (seconds); a usage error should be instant.
    from retinanet.data.formats import check_dataset
    report = check_dataset(images, annotations, format=args.format, classes=args.classes,
                           read_images=not args.no_read).with_skip_bad_images(args.skip_bad_images)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    run_cli(main)
