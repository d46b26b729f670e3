"""Loading weights, the one place: reading a file safely (`torch.load(weights_only=True)`: tensors
and plain data only, so that what a user hands us cannot run code), resolving a torchvision
weights name (downloaded once into torch's hub cache, $TORCH_HOME/hub/checkpoints, as torch.hub
does: the file named as its URL, whose `-0676ba61` sha256 prefix is checked on download), mapping
torchvision's keys onto ours, and loading only when every key fits (each missing, unexpected or
reshaped key named).

torchvision RetinaNet (ResNet: without "backbone.body.")   ours
backbone.body.conv1 / bn1 / layerN (fc: dropped)             backbone.stem.0 / stem.1 / layerN
backbone.fpn.inner_blocks.i[.0] / layer_blocks.i[.0]         fpn.lateral.i / fpn.output.i
backbone.fpn.extra_blocks.p6 / p7                            fpn.p6 / p7
head.classification_head.conv.i.0 (.1 = GroupNorm)           head.cls_subnet.<conv> (<conv + 1> = GroupNorm)
head.classification_head.cls_logits                          head.cls_score
head.regression_head.conv / bbox_reg                         head.box_subnet / box_pred
Both RetinaNet layouts are read: the current one ("conv.i.0") and the one of its published v1
checkpoint ("conv.{2i}" for conv i, "inner_blocks.i").
"""
from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import get_weight

from .errors import CheckpointError, ConfigError, MissingFileError

ARCHS = ("v1", "v2")
# torchvision's RetinaNet weights: the architecture they convert to and the config that builds it
RETINANETS = {"RetinaNet_ResNet50_FPN_Weights": ("v1", "configs/torchvision/retinanet_resnet50_fpn.yaml"),
              "RetinaNet_ResNet50_FPN_V2_Weights": ("v2", "configs/torchvision/retinanet_resnet50_fpn_v2.yaml")}
CLASSIFIER = ("head.cls_score.weight", "head.cls_score.bias")  # re-initialised for another class count
_HEADS = {"classification_head": ("cls_subnet", "cls_logits", "cls_score"),
          "regression_head": ("box_subnet", "bbox_reg", "box_pred")}


def load_checkpoint(path: str | Path) -> dict:
    """Reads a checkpoint or weights file safely (`weights_only=True`, on the CPU).

    Raises MissingFileError, or CheckpointError naming the file when it holds pickled objects
    beyond plain data (an old-format checkpoint or an unknown source) or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused: it holds pickled Python objects, not only tensors and plain data, and "
            "cannot be read as a torch checkpoint without running them (a checkpoint written before "
            "retinanet's plain-data format, or from an unknown source). If you trust the file, rewrite "
            f"it once with `python tools/upgrade_checkpoint.py {path} --trust`") from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({' '.join(str(error).split())[:200]})") from None


def is_path(source: str | Path) -> bool:
    """A path (an existing file or a name ending in .pth / .pt), else a torchvision weights name."""
    return isinstance(source, Path) or Path(source).is_file() or source.endswith((".pth", ".pt"))


def unwrap_state_dict(loaded: object, source: str | Path = "weights") -> dict[str, Tensor]:
    """The state dict inside a loaded file: bare, or under "model" (a trainer checkpoint) or
    "state_dict", with DistributedDataParallel's "module." prefix removed."""
    for key in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in loaded.items()):
        raise CheckpointError(f"{source}: not a state dict (nor a checkpoint holding one under 'model')")
    if loaded and all(k.startswith("module.") for k in loaded):
        return {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


def download(url: str) -> dict:
    """The file at `url` from torch's hub cache, downloaded there first when absent (progress bar;
    the sha256 prefix that the file name carries, checked by torch.hub). Raises MissingFileError
    naming the URL, the file and the folder to put it in when it cannot be downloaded."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(urlparse(url).path).name
    if not path.is_file():
        prefix = torch.hub.HASH_REGEX.search(path.name)
        print(f"downloading {url} to {path}", file=sys.stderr)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), prefix and prefix[1], progress=True)
        except OSError as error:  # URLError included: offline, a firewall, a proxy
            raise MissingFileError(
                f"cannot download {url} ({getattr(error, 'reason', error)}): fetch it where there is "
                f"network access and put it into {folder} as {path.name}") from None
        except RuntimeError as error:  # torch.hub's hash check; the partial file is deleted
            raise CheckpointError(f"{url}: the download is not the published file ({error}): try "
                                  f"again, or put a good copy into {folder} as {path.name}") from None
    return load_checkpoint(path)


def read_weights(source: str | Path, *, key: str, kinds: tuple[str, ...], not_found: str
                 ) -> tuple[dict[str, Tensor], str | None]:
    """The state dict that `source` (a file, or a torchvision weights name of one of the enum
    classes `kinds`) holds, and the name's class (None for a file). `key` and `not_found` are
    for the messages: the config key, and what to say when the file does not exist."""
    if is_path(source):
        if not Path(source).is_file():
            raise MissingFileError(not_found)
        return unwrap_state_dict(load_checkpoint(source), source), None
    try:
        weights = get_weight(source)
    except (ValueError, KeyError):
        raise ConfigError(f"{key}: {source} is neither an existing file (.pth / .pt) nor a torchvision "
                          f"weights name ({' or '.join(kinds)}.<name>, see docs/fine-tuning.md)") from None
    kind = type(weights).__name__
    if kind not in kinds:
        raise ConfigError(f"{key}: {source} is a {kind} name, this takes {' or '.join(kinds)} names")
    return unwrap_state_dict(download(weights.url), source), kind


def load_imagenet_weights(backbone: nn.Module, source: str | Path, *, depth: int) -> None:
    """Loads a torchvision ImageNet ResNet-`depth` into `backbone` (a ResNetBackbone): a file, or
    a name (`ResNet50_Weights.IMAGENET1K_V1`, or `IMAGENET1K_V1` for this depth). The
    classifier ("fc.*") is dropped; anything else that does not fit is an error."""
    if not is_path(source) and "." not in str(source):
        source = f"ResNet{depth}_Weights.{source}"
    state, _ = read_weights(source, key="model.backbone.weights", kinds=(f"ResNet{depth}_Weights",),
                            not_found=f"backbone weights not found: {source} (model.backbone.weights: a path "
                            "is read as it is, nothing is downloaded; a torchvision name such as "
                            "IMAGENET1K_V1 is)")
    state = {_resnet_key(k): v for k, v in state.items() if not k.startswith("fc.")}
    load_state(backbone, state, source=source, what=f"not a torchvision ResNet-{depth} state dict")


def load_model_weights(model: nn.Module, source: str | Path, *, skip_mismatched: bool = False,
                       loaded: Optional[Mapping] = None) -> list[str]:
    """Loads a whole model's weights: a file (a trainer checkpoint or a bare state dict), or
    torchvision's RetinaNet COCO weights by name (`RetinaNet_ResNet50_FPN_Weights.COCO_V1`,
    `RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1`), converted in memory; these fit the architecture
    of configs/torchvision/retinanet_resnet50_fpn[_v2].yaml.

    Every key must fit. With `skip_mismatched` (fine-tuning to another class count) the classifier
    (head.cls_score.*) keeps its fresh initialisation when its shape differs, and its keys are
    returned so that the caller can say so; any other reshaped key is still an error. `loaded`:
    the file `source` already read with load_checkpoint (not read again).
    """
    if loaded is not None:
        state, kind = unwrap_state_dict(loaded, source), None
    else:
        state, kind = read_weights(source, key="model.weights", kinds=tuple(RETINANETS),
                                   not_found=f"weights not found: {source}")
    hint = "check model.* in the config, e.g. num_classes"
    if kind is not None:
        arch, config = RETINANETS[kind]
        state, hint = convert_torchvision_state(state, arch), f"{source} needs the architecture of {config}"
    return load_state(model, state, source=source, hint=hint, reinit=CLASSIFIER if skip_mismatched else ())


def load_state(module: nn.Module, state: Mapping[str, Tensor], *, source: str | Path, what: str = "",
               hint: str = "", reinit: tuple[str, ...] = ()) -> list[str]:
    """Loads `state` into `module` once every key fits; the keys of `reinit` whose shape differs
    keep the module's values and are returned. Raises CheckpointError naming `source`, `what` is
    wrong, the reshaped, missing and unexpected keys, and the `hint`."""
    reshaped, others, kept = _misfit(state, module.state_dict(), reinit)
    if reshaped or others:
        raise CheckpointError(f"{source}: {_describe(what, reshaped, others, hint)}")
    module.load_state_dict({k: v for k, v in state.items() if k not in kept}, strict=False)
    return kept


def _misfit(state: Mapping[str, Tensor], expected: Mapping[str, Tensor],
            reinit: tuple[str, ...] = ()) -> tuple[list[str], list[str], list[str]]:
    """The problems of `state` against `expected` (a model's state dict) as phrases: (reshaped,
    missing and unexpected, the reshaped keys of `reinit`). BatchNorm's step counters are not
    compared: FrozenBN has none, and evaluation never reads them."""
    reshaped = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    kept = [k for k in reshaped if k in reinit]
    reshaped = [k for k in reshaped if k not in reinit]
    counters = {k for k in [*state, *expected] if k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state) - counters)
    unexpected = sorted(set(state) - set(expected) - counters)
    shapes = [f"{reshaped[0]} has shape {tuple(state[reshaped[0]].shape)}, the model has "
              f"{tuple(expected[reshaped[0]].shape)}", f"shape mismatch in {_few(reshaped)}"] if reshaped else []
    others = [f"{word} {_few(keys)}" for word, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    return shapes, others, kept


def _few(keys: list[str], n: int = 5) -> str:
    return f"{keys[:n]}{f' and {len(keys) - n} more' if len(keys) > n else ''}"


def _describe(what: str, reshaped: list[str], others: list[str], hint: str) -> str:
    # a reshaped key leads when nothing else is said: "w.pth: head.cls_score.weight has shape ..."
    lead = what or ("" if reshaped else "weights do not fit this model")
    return f"{lead + ': ' if lead else ''}{'; '.join(reshaped + others)}{f' ({hint})' if hint else ''}"


def num_classes_of(state: Mapping[str, Tensor], num_anchors: int = 9) -> int:
    """Class count of a torchvision RetinaNet state dict, from its classifier's output channels."""
    key = "head.classification_head.cls_logits.weight"
    if key not in state:
        raise CheckpointError(f"no {key}: not a torchvision RetinaNet state dict")
    return state[key].shape[0] // num_anchors


def convert_torchvision_state(state: Mapping[str, Tensor], arch: str) -> dict[str, Tensor]:
    """torchvision RetinaNet state dict (`retinanet_resnet50_fpn` = v1, `_v2` = v2) -> ours.

    Raises CheckpointError naming every key it cannot place. BatchNorm's `num_batches_tracked`
    counters are dropped (our detection backbones use FrozenBN, which has none).
    """
    if arch not in ARCHS:
        raise CheckpointError(f"arch must be one of {ARCHS}, got {arch!r}")
    out = {k: (_map_key(k, arch == "v2"), v) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    unknown = [k for k, (new, _) in out.items() if new is None]
    if unknown:
        raise CheckpointError(f"{len(unknown)} key(s) are not part of a torchvision RetinaNet {arch}: "
                              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return dict(out.values())


def check_against(converted: Mapping[str, Tensor], expected: Mapping[str, Tensor], arch: str) -> None:
    """Raises CheckpointError on any key missing from, unexpected in, or of another shape than
    `expected` (our model's state dict), with a hint when the other architecture fits better."""
    reshaped, others, _ = _misfit(converted, expected)
    if reshaped or others:
        p6 = converted.get("fpn.p6.weight")
        guess = None if p6 is None else ("v1" if p6.shape[1] == 256 else "v2")
        hint = f"it looks like a {guess} checkpoint: try --arch {guess}" if guess and guess != arch else ""
        raise CheckpointError(_describe(f"does not fit RetinaNet {arch}", reshaped, others, hint))


def _resnet_key(key: str) -> str:
    """A torchvision ResNet key -> ours: the stem is one Sequential (conv1, bn1, relu, maxpool)."""
    for prefix, stem in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if key.startswith(prefix):
            return stem + key[len(prefix):]
    return key


def _map_key(key: str, head_norm: bool) -> str | None:
    if key.startswith("backbone.body."):
        rest = _resnet_key(key[len("backbone.body."):])
        return "backbone." + rest if re.match(r"stem\.[01]\.|layer[1-4]\.", rest) else None
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
