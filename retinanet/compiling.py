"""torch.compile with one failure policy: where compilation fails, warn once and run eagerly."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch


class CompiledOrNone:
    """fn through torch.compile (built at the first call), or None where that fails.

    Compilation happens inside a call (again for each new input signature), so the dynamo and
    inductor settings are patched in around every call. On any failure (no C++ compiler, an
    unsupported op, a dynamo limit made an error by the settings) it warns once, naming
    `setting` (the config key that chose it), returns None, and never tries again: the caller
    then runs its eager path, which also raises again any error of the code itself.
    """

    def __init__(self, fn: Callable, setting: str, *, dynamic: Optional[bool] = None,
                 dynamo_config: Optional[dict[str, Any]] = None,
                 inductor_config: Optional[dict[str, Any]] = None):
        self.fn, self.setting, self.dynamic = fn, setting, dynamic
        self.dynamo_config, self.inductor_config = dynamo_config or {}, inductor_config or {}
        self.compiled: Optional[Callable] = None
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return None
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=self.dynamic)
            with torch._dynamo.config.patch(**self.dynamo_config), \
                    torch._inductor.config.patch(**self.inductor_config):
                return self.compiled(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager path gives the same
            self.failed = True
            warnings.warn(f"torch.compile failed, running eagerly instead ({self.setting}): "
                          f"{type(exc).__name__}: {exc}")
            return None
