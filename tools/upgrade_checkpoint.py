"""Rewrite a checkpoint written before the plain-data format so that it loads safely:
python tools/upgrade_checkpoint.py OLD.pth --trust [--output NEW.pth]

Older checkpoints pickled the Config dataclass and numpy's RNG state, so reading them needs a
full unpickle, which runs any code the file carries. retinanet refuses to do that implicitly.
Run this once, only on files you wrote yourself or otherwise trust: it unpickles OLD.pth and
writes NEW.pth (default: OLD.pth in place, atomically) holding only tensors and plain data
(the config as YAML text), which training, --weights, model.weights and resume then load
with torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retinanet.cli import run_cli  # noqa: E402
from retinanet.errors import ConfigError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="the old checkpoint (.pth)")
    parser.add_argument("--output", default=None, help="where to write (default: replace the input)")
    parser.add_argument("--trust", action="store_true",
                        help="required: you trust this file enough to let it run code while it is read")
    args = parser.parse_args()
    if not args.trust:
        raise ConfigError(f"{args.checkpoint}: reading an old checkpoint unpickles it, which can run "
                          "code; pass --trust if you wrote it yourself or otherwise trust it")
    from retinanet.engine.checkpoint import upgrade_checkpoint

    output = Path(args.output or args.checkpoint)
    upgrade_checkpoint(args.checkpoint, output)
    print(f"wrote {output} (plain data: loads with weights_only=True)")
    return 0


if __name__ == "__main__":
    run_cli(main)
