"""Shared command-line plumbing for tools/: `key=value` overrides anywhere on the line, and the
user's errors (retinanet.errors) as one line with exit code 2; everything else keeps its traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import TrainingDiverged, UserError


class _IntermixedParser(argparse.ArgumentParser):
    """Positional overrides may come before, between or after the options
    (`--config C a=1 --weights W b=2`): plain argparse stops collecting them at the first option."""

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def config_parser(description: str, *, config_required: bool = True) -> argparse.ArgumentParser:
    """`config_required=False` for tools that can take the config a checkpoint carries."""
    parser = _IntermixedParser(description=description)
    parser.add_argument("--config", required=config_required,
                        help="YAML config file" + ("" if config_required else
                                                   " (default: the one the checkpoint carries)"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides anywhere on the line, e.g. train.max_iter=100")
    return parser


def dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """--images, --annotations, --format and --classes: one split of a dataset in any format."""
    parser.add_argument("--images", required=True, help="image folder (data.<split>.images)")
    parser.add_argument("--annotations", required=True,
                        help="COCO json, VOC Annotations folder or ImageSets list, YOLO data.yaml "
                             "or labels folder (data.<split>.annotations)")
    parser.add_argument("--format", choices=["auto", "coco", "voc", "yolo"], default="auto",
                        help="dataset format (default auto: from what --annotations names)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                        help="class names in label order (data.classes)")


def view_arguments(parser: argparse.ArgumentParser) -> None:
    """--slice H W, --overlap and --tta, for the tools that run a Detector (eval, infer); after
    parsing, `view_overrides(args)` turns --tta into its config override."""
    parser.add_argument("--slice", type=positive_int, nargs=2, metavar=("H", "W"), default=None,
                        help="also detect on H x W tiles at native resolution, merged with the whole image")
    parser.add_argument("--overlap", type=float, default=0.25,
                        help="with --slice: the fraction of a tile its neighbours share (default 0.25)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: eval.tta.enabled=true (flip, and eval.tta.scales)")


def view_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides with --tta's added."""
    return [*args.overrides, "eval.tta.enabled=true"] if args.tta else list(args.overrides)


def positive_int(text: str) -> int:
    """argparse type for counts such as --batch-size."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main`. Our own user-facing errors print one line: exit 1 for a run that diverged,
    2 for everything else the user can fix (bad config, bad data, a missing or unsafe file)."""
    try:
        sys.exit(main() or 0)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
