"""Check a COCO-format dataset before training:

    python tools/check_dataset.py --images DIR --annotations FILE [--no-read]

Prints one line per problem (errors, then warnings) with counts and the first offending ids.
Exit code 0: no errors (warnings allowed); 1: errors found; 2: usage error (a path that does not
exist, a bad argument).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import run_cli  # noqa: E402
from retinanet.errors import MissingFileError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True,
                        help="folder that the json's file_name values are relative to")
    parser.add_argument("--annotations", required=True, help="COCO instances json")
    parser.add_argument("--no-read", action="store_true",
                        help="only check that image files exist; do not decode them (fast on COCO train)")
    args = parser.parse_args()
    # A wrong path is a usage error (exit 2), not a finding about the dataset.
    annotations, images = Path(args.annotations), Path(args.images)
    if not annotations.is_file():
        raise MissingFileError(f"annotation file not found: {annotations} (check --annotations)")
    if not images.is_dir():
        raise MissingFileError(f"image folder not found: {images} (check --images)")
    # Imported only now: retinanet.data imports torch (seconds); a usage error should be instant.
    from retinanet.data.checks import check_coco_dataset
    report = check_coco_dataset(images, annotations, read_images=not args.no_read)
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    run_cli(main)
