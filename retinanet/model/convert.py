"""Key mapping from torchvision's RetinaNet state dicts to ours (no I/O: tools/convert_torchvision.py
reads and writes the files).

torchvision names                                    ours
backbone.body.conv1 / bn1                            backbone.stem.0 / stem.1
backbone.body.layerN                                 backbone.layerN
backbone.fpn.inner_blocks.i[.0]                      fpn.lateral.i
backbone.fpn.layer_blocks.i[.0]                      fpn.output.i
backbone.fpn.extra_blocks.p6 / p7                    fpn.p6 / p7
head.classification_head.conv.i.0 (.1 = GroupNorm)   head.cls_subnet.<conv> (<conv + 1> = GroupNorm)
head.classification_head.cls_logits                  head.cls_score
head.regression_head.conv / bbox_reg                 head.box_subnet / box_pred

Both of torchvision's layouts are read: the current one (Conv2dNormActivation, "conv.i.0") and
the one its published v1 checkpoint was saved in ("conv.{2i}" for conv i, "inner_blocks.i").
"""
from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

from ..errors import CheckpointError

ARCHS = ("v1", "v2")

_HEADS = {"classification_head": ("cls_subnet", "cls_logits", "cls_score"),
          "regression_head": ("box_subnet", "bbox_reg", "box_pred")}


class ConversionError(CheckpointError):
    """The state dict is not a torchvision RetinaNet of the requested architecture."""


def unwrap_state_dict(obj: object) -> dict[str, Tensor]:
    """A bare state dict, or the one under "model" / "state_dict" (training checkpoints)."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise ConversionError("not a state dict (nor a dict holding one under 'model')")
    return dict(obj)


def num_classes_of(state: Mapping[str, Tensor], num_anchors: int = 9) -> int:
    """Class count of a torchvision RetinaNet state dict, from its classifier's output channels."""
    key = "head.classification_head.cls_logits.weight"
    if key not in state:
        raise ConversionError(f"no {key}: not a torchvision RetinaNet state dict")
    return state[key].shape[0] // num_anchors


def convert_torchvision_state(state: Mapping[str, Tensor], arch: str) -> dict[str, Tensor]:
    """torchvision RetinaNet state dict (`retinanet_resnet50_fpn` = v1, `_v2` = v2) -> ours.

    Raises ConversionError naming every key it cannot place. BatchNorm's `num_batches_tracked`
    counters are dropped (our detection backbones use FrozenBN, which has none).
    """
    if arch not in ARCHS:
        raise ConversionError(f"arch must be one of {ARCHS}, got {arch!r}")
    head_norm = arch == "v2"
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        new = _map_key(key, head_norm)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ConversionError(f"{len(unknown)} key(s) are not part of a torchvision RetinaNet {arch}: "
                              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return out


def check_against(converted: Mapping[str, Tensor], expected: Mapping[str, Tensor], arch: str) -> None:
    """Raises ConversionError on any key missing from, unexpected in, or of another shape than
    `expected` (our model's state dict), with a hint when the other architecture fits better."""
    wanted = {k for k in expected if not k.endswith("num_batches_tracked")}
    missing = sorted(wanted - set(converted))
    unexpected = sorted(set(converted) - wanted)
    shapes = [f"{k}: {tuple(converted[k].shape)} vs ours {tuple(expected[k].shape)}"
              for k in sorted(wanted & set(converted))
              if tuple(converted[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if shapes:
        parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
    p6 = converted.get("fpn.p6.weight")
    guess = None if p6 is None else ("v1" if p6.shape[1] == 256 else "v2")
    hint = f" (it looks like a {guess} checkpoint: try --arch {guess})" if guess and guess != arch else ""
    raise ConversionError(f"does not fit RetinaNet {arch}: " + "; ".join(parts) + hint)


def _map_key(key: str, head_norm: bool) -> str | None:
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        if rest.startswith("conv1."):
            return "backbone.stem.0." + rest[len("conv1."):]
        if rest.startswith("bn1."):
            return "backbone.stem.1." + rest[len("bn1."):]
        return "backbone." + rest if re.match(r"layer[1-4]\.", rest) else None
    match = re.fullmatch(r"backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(?:0\.)?(weight|bias)", key)
    if match:
        kind, index, param = match.groups()
        return f"fpn.{'lateral' if kind == 'inner_blocks' else 'output'}.{index}.{param}"
    match = re.fullmatch(r"backbone\.fpn\.extra_blocks\.(p6|p7)\.(weight|bias)", key)
    if match:
        return f"fpn.{match[1]}.{match[2]}"
    match = re.fullmatch(r"head\.(classification_head|regression_head)\.(.+)", key)
    if not match:
        return None
    subnet, final_in, final_out = _HEADS[match[1]]
    rest = match[2]
    if rest.startswith(final_in + "."):
        return f"head.{final_out}.{rest[len(final_in) + 1:]}"
    # ours: [conv, (GroupNorm,) ReLU] per layer
    per_layer = 3 if head_norm else 2
    new_layout = re.fullmatch(r"conv\.(\d+)\.([01])\.(weight|bias)", rest)
    if new_layout:
        layer, part, param = int(new_layout[1]), int(new_layout[2]), new_layout[3]
        if part == 1 and not head_norm:
            return None
        return f"head.{subnet}.{layer * per_layer + part}.{param}"
    old_layout = re.fullmatch(r"conv\.(\d+)\.(weight|bias)", rest)  # Sequential(conv, relu, ...)
    if old_layout and not head_norm and int(old_layout[1]) % 2 == 0:
        return f"head.{subnet}.{int(old_layout[1]) // 2 * per_layer}.{old_layout[2]}"
    return None
