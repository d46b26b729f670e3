"""The errors a user can fix: each names the key, file, line or id at fault and says what to do.

`retinanet.cli.run_cli` prints these as one line (exit 2; a diverged run exits 1); any other
exception is a bug or an environment failure and keeps its traceback. Each subclasses the
builtin it refines, so callers that catch ValueError / FileNotFoundError keep working.
"""
from __future__ import annotations


class UserError(Exception):
    """Base of the errors that are the user's input, not the code. The message is one line."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema, or settings that contradict."""


class DataError(UserError, ValueError):
    """A dataset, annotation file or image that cannot be used as given."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named by the user (config, weights, images) does not exist."""


class CheckpointError(UserError, ValueError):
    """A weights or checkpoint file that cannot be loaded safely or does not fit the model."""


class TrainingDiverged(UserError, FloatingPointError):
    """Too many consecutive non-finite steps, or non-finite weights about to be saved (exit 1)."""
