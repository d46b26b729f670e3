"""Train a RetinaNet: python tools/train.py --config configs/X.yaml [key=value ...] [--resume PATH|auto]

Several processes (one per GPU, or CPU processes with gloo):
    torchrun --nproc_per_node=N tools/train.py --config configs/X.yaml [key=value ...]
With `torchrun --max-restarts K`, a job whose rank dies restarts from its newest checkpoint.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import config_parser, run_cli  # noqa: E402
from retinanet.errors import TrainingDiverged, UserError  # noqa: E402


def main() -> int:
    parser = config_parser(__doc__)
    parser.add_argument("--resume", default=None,
                        help="checkpoint to resume from, or 'auto' for the latest in output_dir")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen, also in a pipe
    from retinanet.config import load_config
    from retinanet.engine import elastic
    from retinanet.engine.distributed import cleanup, launched_by_torchrun
    from retinanet.engine.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    repeated = elastic.repeated_failure()
    if repeated is not None:  # torchrun restarts on any exit code: each later attempt ends here at once
        message, exit_code = repeated
        if rank == 0:
            print(f"error: {message}", file=sys.stderr)
        return exit_code
    if launched_by_torchrun() and rank != 0:
        logging.getLogger("retinanet").setLevel(logging.ERROR)  # rank 0 alone reports
    try:
        Trainer(load_config(args.config, args.overrides), resume=args.resume).train()
    except UserError as error:  # bad config, data or file (exit 2), or diverged (exit 1): it would repeat
        elastic.failure_repeats(str(error), 1 if isinstance(error, TrainingDiverged) else 2)
        raise
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    run_cli(main)
