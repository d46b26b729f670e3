"""Convert a torchvision RetinaNet checkpoint to this project's format.

    python tools/convert_torchvision.py --src retinanet_resnet50_fpn_coco-eeacb38b.pth \
        --dst runs/tv_v1.pth --arch v1

--arch v1 is torchvision's retinanet_resnet50_fpn, v2 its retinanet_resnet50_fpn_v2; the result
loads into configs/torchvision/retinanet_resnet50_fpn[_v2].yaml (tools/eval.py --weights, or
model.weights=... to fine-tune). --src is a bare state dict or a dict holding one under "model".
Every key and shape is checked against the model that config builds; any mismatch is an error.
model.weights=RetinaNet_ResNet50_FPN_Weights.COCO_V1 (or _V2_) does the same in memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retinanet.cli import run_cli  # noqa: E402
from retinanet.errors import CheckpointError  # noqa: E402

CONFIGS = {"v1": ROOT / "configs/torchvision/retinanet_resnet50_fpn.yaml",
           "v2": ROOT / "configs/torchvision/retinanet_resnet50_fpn_v2.yaml"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="torchvision RetinaNet checkpoint (.pth)")
    parser.add_argument("--dst", required=True, help="where to write the converted weights")
    parser.add_argument("--arch", required=True, choices=sorted(CONFIGS))
    args = parser.parse_args()
    from retinanet.config import load_config
    from retinanet.engine.checkpoint import atomic_save
    from retinanet.model import build_model
    from retinanet.weights import (check_against, convert_torchvision_state, load_checkpoint,
                                   num_classes_of, unwrap_state_dict)

    loaded = load_checkpoint(args.src)
    try:
        state = unwrap_state_dict(loaded)
        num_classes = num_classes_of(state)
        converted = convert_torchvision_state(state, args.arch)
        config = load_config(CONFIGS[args.arch], [f"model.num_classes={num_classes}"])
        model = build_model(config.model, num_classes, load_backbone_weights=False)
        check_against(converted, model.state_dict(), args.arch)
    except CheckpointError as error:
        raise CheckpointError(f"{args.src}: {error}") from None
    atomic_save({"model": converted, "converted_from": args.src, "arch": args.arch,
                 "num_classes": num_classes}, args.dst)
    print(f"wrote {args.dst}: torchvision RetinaNet {args.arch}, {num_classes} classes, "
          f"{len(converted)} tensors; use it with {CONFIGS[args.arch].relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
