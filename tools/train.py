"""Train a RetinaNet: python tools/train.py --config configs/X.yaml [key=value ...] [--resume PATH|auto]

Several processes (one per GPU, or CPU processes with gloo):
    torchrun --nproc_per_node=N tools/train.py --config configs/X.yaml [key=value ...]
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, run_cli  # noqa: E402


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--resume", default=None,
                        help="checkpoint to resume from, or 'auto' for the latest in output_dir")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in a pipe
    from retinanet.config import load_config
    from retinanet.engine.trainer import Trainer

    from retinanet.engine.distributed import cleanup, launched_by_torchrun

    config = load_config(args.config, args.overrides)
    if launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0:
        logging.getLogger("retinanet").setLevel(logging.ERROR)  # rank 0 alone reports
    try:
        Trainer(config, resume=args.resume).train()
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    run_cli(main)
