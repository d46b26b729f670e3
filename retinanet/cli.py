"""Shared command-line plumbing for tools/: config errors become one line and exit code 2."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .config import ConfigError


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. train.max_iter=100")
    return parser


def positive_int(text: str) -> int:
    """argparse type for counts such as --batch-size."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_cli(main: Callable[[], int | None]) -> None:
    """Runs `main`; user errors (bad config, missing file, bad value) print one line, exit 2."""
    try:
        sys.exit(main() or 0)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as error:  # training diverged (see Trainer.step): said, not traced
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
