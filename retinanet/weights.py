"""Reading weights and checkpoints safely: every file a user hands us (--weights, model.weights,
--resume) is loaded here with `torch.load(weights_only=True)`, tensors and plain data only, so
that reading it cannot run code.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .errors import CheckpointError, MissingFileError


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
            f"{path}: refused: it holds pickled Python objects, not only tensors and plain data "
            "(a checkpoint written before retinanet's plain-data format, or from an unknown source), "
            "and loading those can run code. If you trust the file, rewrite it once with "
            f"`python tools/upgrade_checkpoint.py {path} --trust`") from None
    except (RuntimeError, EOFError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({' '.join(str(error).split())[:200]})") from None


def model_state(loaded, path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict inside a loaded file: a trainer checkpoint's "model" entry or a
    bare state dict."""
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: not a state dict or a checkpoint holding 'model'")
    return loaded


def load_model_weights(model: torch.nn.Module, path: str | Path, *,
                       skip_mismatched: bool = False) -> list[str]:
    """Loads a trainer checkpoint ({"model": ...}) or a bare state dict into `model`.

    Every key must exist on both sides. A shape mismatch is an error, or with `skip_mismatched`
    (fine-tuning to another class count) the parameter keeps its current value and its key is
    returned, so that the caller can say what was re-initialised.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights not found: {path}")
    state = model_state(load_checkpoint(path), path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched and not skip_mismatched:
        key = mismatched[0]
        raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, the model has "
                              f"{tuple(own[key].shape)} (check model.* in the config, e.g. num_classes)")
    result = model.load_state_dict({k: v for k, v in state.items() if k not in mismatched}, strict=False)
    # BatchNorm's step counters are absent from FrozenBN checkpoints and unused in eval
    missing = [k for k in result.missing_keys
               if k not in mismatched and not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{path}: weights do not fit this model: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]} (check model.* in the config)")
    return mismatched
