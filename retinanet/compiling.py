"""torch.compile with one failure policy: where compilation fails, warn once and run eagerly."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
from torch._inductor.exc import CppCompileError, InvalidCxxCompiler, TritonMissing

# What "could not compile" raises: every dynamo error (BackendCompilerFailed and InductorError
# wrap the backend's own, Unsupported, InternalTorchDynamoError, TorchRuntimeError from tracing
# an op on fake tensors), dynamo's recompile limit made an error, and a C++ / CUDA compiler that
# fails or is missing. Errors of the compiled code when it runs (an op's RuntimeError,
# torch.OutOfMemoryError, a ValueError of ours) are none of these.
COMPILE_ERRORS = (TorchDynamoException, FailOnRecompileLimitHit, CppCompileError, InvalidCxxCompiler)
# Failures of the environment rather than of one graph: no input will compile.
_NEVER_COMPILES = (InvalidCxxCompiler, TritonMissing)


def _causes(exc: Optional[BaseException]):
    """exc and what it wraps (BackendCompilerFailed.inner_exception, `raise ... from`)."""
    while exc is not None:
        yield exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__


class CompiledOrNone:
    """fn through torch.compile (built at the first call), or None where it cannot be compiled.

    Compilation happens inside a call (again for each new input signature), so the dynamo and
    inductor settings are patched in around every call. Where compilation fails it warns once,
    naming `setting` (the config key that chose it), and returns None: the caller runs its eager
    path, which gives the same results (and raises again any error of the code itself, with its
    own type, e.g. where tracing an op on fake tensors failed). The failure is remembered for that
    input signature only (shapes, or ranks when `dynamic`, dtypes, devices, plain values), since
    one graph failing says little about another; a missing C++ compiler or Triton fails them all.
    Errors raised while the compiled code runs propagate unchanged: falling back would hide them
    (out of memory, a bug) and run the step a second time.
    """

    def __init__(self, fn: Callable, setting: str, *, dynamic: Optional[bool] = None,
                 dynamo_config: Optional[dict[str, Any]] = None,
                 inductor_config: Optional[dict[str, Any]] = None,
                 backend: str | Callable = "inductor"):
        self.fn, self.setting, self.dynamic, self.backend = fn, setting, dynamic, backend
        self.dynamo_config, self.inductor_config = dynamo_config or {}, inductor_config or {}
        self.compiled: Optional[Callable] = None
        self.failed: set[tuple] = set()  # signatures that did not compile
        self.never = False  # the environment cannot compile anything
        self.warned = False

    def signature(self, args: tuple) -> tuple:
        return tuple((a.dim() if self.dynamic else tuple(a.shape), a.dtype, a.device, a.requires_grad)
                     if isinstance(a, torch.Tensor) else
                     a if isinstance(a, (bool, int, float, str, type(None))) else type(a)
                     for a in args)

    def __call__(self, *args):
        key = self.signature(args)
        if self.never or key in self.failed:
            return None
        try:
            if self.compiled is None:  # raises where dynamo does not support this Python / platform
                self.compiled = torch.compile(self.fn, dynamic=self.dynamic, backend=self.backend)
        except RuntimeError as exc:
            return self._fail(key, exc, never=True)
        try:
            with torch._dynamo.config.patch(**self.dynamo_config), \
                    torch._inductor.config.patch(**self.inductor_config):
                return self.compiled(*args)
        except COMPILE_ERRORS as exc:
            return self._fail(key, exc, never=any(isinstance(e, _NEVER_COMPILES) for e in _causes(exc)))

    def _fail(self, key: tuple, exc: Exception, never: bool) -> None:
        self.failed.add(key)
        self.never = never
        if not self.warned:
            self.warned = True
            warnings.warn(f"torch.compile failed, running eagerly instead ({self.setting}): "
                          f"{type(exc).__name__}: {exc}")
        return None
