"""Sigmoid focal loss (Lin et al., 2017): FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t).

(1 - p_t)^gamma down-weights easy examples, so the flood of easy background anchors cannot drown
the rare hard ones; alpha_t balances positives (alpha) against negatives (1 - alpha). Computed in
float32 whatever the input dtype: fp16 log() and small powers underflow.

The formula is written once, in focal_terms_and_grad (focal_triton.py restates it in Triton and
is tested against it). The kernels that sum it over (N, K) logits, eager, compile and triton,
are device fast paths: select_focal_kernel picks one, and FocalKernel calls it once per device,
dtype and size class, outside autograd.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compiling import CompiledOrNone
from ..errors import ConfigError
from .focal_triton import TritonFocalLoss, triton_focal_available

KERNELS = ("auto", "eager", "compile", "triton")
# Elements per chunk of the eager loss on CPU (128 K: ~1600 rows at K = 80): the elementwise
# temporaries of a chunk stay in cache instead of streaming N x K tensors through memory.
_CHUNK_ELEMENTS = 1 << 17
# On a GPU chunks only bound the temporaries: many small ones would cost a launch per op each.
_GPU_CHUNK_ELEMENTS = 1 << 24
# From this size up, "auto" on CPU compiles: below it the one-time compilation does not pay.
_COMPILE_MIN_ELEMENTS = 1 << 22
# log1p(e) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = e / (2 + e) <= 1/3 for e <= 1:
# the Horner coefficients 2/(2j + 1) of s^2, highest first. Seven terms leave < 2e-8 relative.
_LOG1P_SERIES = tuple(2.0 / (2 * j + 1) for j in range(6, -1, -1))


def upcast(tensor: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 stay as they are."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def _sigmoid_and_softplus(x: Tensor, one_exp: bool) -> tuple[Tensor, Tensor]:
    """(sigmoid(x), softplus(x)). one_exp, for the compiled loop, which is bound by its
    transcendentals: both from e = exp(-|x|), sigmoid = 1/(1+e) or e/(1+e), softplus =
    max(x, 0) + log1p(e), with one division for 1/(1+e) and e/(2+e), and log1p(e) as a short
    series (vectorised log1p costs several exps; <= 4e-7 relative against float64, torch's own
    is 1.2e-7). Eager runs torch's two kernels instead (fewer passes)."""
    if not one_exp:
        return torch.sigmoid(x), F.softplus(x)
    e = torch.exp(-x.abs())
    d = 1.0 / ((1.0 + e) * (2.0 + e))
    r = (2.0 + e) * d  # 1 / (1 + e)
    s = e * (1.0 + e) * d  # e / (2 + e)
    s2 = s * s
    series = _LOG1P_SERIES[0]
    for coefficient in _LOG1P_SERIES[1:]:
        series = series * s2 + coefficient
    return torch.where(x >= 0, r, e * r), x.clamp(min=0) + s * series


def focal_terms_and_grad(x: Tensor, t: Tensor | float, alpha: Optional[float], gamma: float,
                         row_weights: Optional[Tensor] = None, need_grad: bool = False,
                         one_exp: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """The focal loss's terms w_n alpha_t (1 - p_t)^gamma ce for logits x (n, K) against (soft)
    binary targets t in [0, 1] ((n, K), or a scalar for every entry), in x's dtype, and with
    need_grad their derivative in x (n, K) in closed form (in place: not under autograd).

    With p = sigmoid(x), ce = -t log p - (1 - t) log(1 - p) = softplus(x) - t x (finite for any
    logit), a = 1 - 2t, m = 1 - p_t = p a + t, alpha_t = alpha t + (1 - alpha)(1 - t) (1 when
    alpha is None or < 0): FL = alpha_t ce m^gamma and
    dFL/dx = alpha_t [(p - t) m^gamma + ce gamma m^(gamma - 1) a p (1 - p)].
    row_weights (n,) scale rows; one_exp: sigmoid and softplus from one exp (the compiled loop).
    """
    p, ce = _sigmoid_and_softplus(x, one_exp)
    zero_target = not isinstance(t, Tensor) and t == 0  # every entry a negative: m = p, fewer passes
    if not zero_target:
        ce = ce - t * x
    a = 1.0 - 2.0 * t
    m = p if zero_target else p * a + t
    mod = None if gamma == 0 else m * m if gamma == 2 else m.pow(gamma)
    weight = t * (2 * alpha - 1) + (1 - alpha) if alpha is not None and alpha >= 0 else None
    if row_weights is not None:
        w = row_weights[:, None].to(x.dtype)
        weight = w if weight is None else weight * w
    terms = ce if mod is None else ce * mod
    if weight is not None:
        terms = terms * weight
    if not need_grad:
        return terms, None
    grad = p - t
    if mod is not None:
        # m^(gamma - 1) at m = 0 is inf for gamma < 1; the term is 0 there (p (1 - p) = 0)
        dmod = 2.0 * m if gamma == 2 else gamma * m.clamp(min=torch.finfo(x.dtype).tiny).pow(gamma - 1)
        ce = ce.mul_(dmod) if zero_target else ce.mul_(dmod).mul_(a)  # a = 1 for a zero target
        grad = grad.mul_(mod).add_(ce.mul_(p * (1 - p)))
    return terms, grad if weight is None else grad.mul_(weight)


def binary_focal_terms(logits: Tensor, targets: Tensor | float, alpha: Optional[float],
                       gamma: float) -> Tensor:
    """Elementwise focal terms (focal_terms_and_grad) of logits (..., K) against (soft) binary
    targets in [0, 1] (broadcast, or a scalar), differentiable by autograd; float32 math for
    half-precision logits. alpha None (or < 0): no balancing."""
    return focal_terms_and_grad(upcast(logits), targets, alpha, gamma)[0]


def _one_exp_loss_and_grad(logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
                           row_weights: Optional[Tensor], alpha: Optional[float], gamma: float,
                           t_pos: float, t_neg: float, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The summed loss and its gradient as one loop over the whole tensor, what torch.compile
    fuses: the targets come from float `targets` (N, K) or from integer `classes` (N,) (t_pos at
    k == class, else t_neg) inside the loop, compared in int32 (half the lanes of int64)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if classes is not None:
        class_ids = torch.arange(logits.shape[1], device=logits.device, dtype=torch.int32)
        t = torch.where(classes.to(torch.int32)[:, None] == class_ids, t_pos, t_neg).to(dtype)
    else:
        t = targets.to(dtype)
    terms, grad = focal_terms_and_grad(logits.to(dtype), t, alpha, gamma, row_weights, need_grad, True)
    # Rows summed in the working dtype, rows in a float64 accumulator: a float32 running sum
    # over millions of terms drifts, and a float64 add per element would slow the loop.
    return terms.sum(dim=1).sum(dtype=torch.float64).to(dtype), grad


# Past dynamo's recompile limit (many loss variants in one process) torch would silently run
# the whole-tensor math eagerly, (N, K) temporaries by the dozen: made an error, so that the
# chunked eager kernel runs instead.
_compiled = CompiledOrNone(_one_exp_loss_and_grad, "loss.cls.kernel", dynamic=True,
                           dynamo_config={"fail_on_recompile_limit_hit": True})


def _eager(logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
           row_weights: Optional[Tensor], alpha: Optional[float], gamma: float, t_pos: float,
           t_neg: float, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """_one_exp_loss_and_grad over row chunks that fit in cache; the gradient is the only (N, K)
    tensor. With class targets every entry is first scored as a negative (the scalar target
    t_neg: fewer passes), then the one positive entry of each foreground row is corrected on its
    own (a (P,) vector)."""
    num_rows, num_classes = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = torch.empty(logits.shape, dtype=dtype, device=logits.device) if need_grad else None
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    chunk_elements = _CHUNK_ELEMENTS if logits.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    chunk = max(1, chunk_elements // max(1, num_classes))
    for start in range(0, num_rows, chunk):
        rows = slice(start, min(start + chunk, num_rows))
        terms, g = focal_terms_and_grad(
            logits[rows].to(dtype), t_neg if classes is not None else targets[rows].to(dtype), alpha,
            gamma, None if row_weights is None else row_weights[rows], need_grad)
        total += terms.sum(dim=1).sum(dtype=torch.float64)
        if need_grad:
            grad[rows] = g
    if classes is not None:
        fg_rows = torch.nonzero((classes >= 0) & (classes < num_classes), as_tuple=True)[0]
        fg_classes = classes[fg_rows]
        x = logits[fg_rows, fg_classes][:, None].to(dtype)
        weights = None if row_weights is None else row_weights[fg_rows]
        positive, g = focal_terms_and_grad(x, t_pos, alpha, gamma, weights, need_grad)
        negative, _ = focal_terms_and_grad(x, t_neg, alpha, gamma, weights)
        total += positive.sum(dtype=torch.float64) - negative.sum(dtype=torch.float64)
        if need_grad:
            grad[fg_rows, fg_classes] = g[:, 0]
    return total.to(dtype), grad


def _compiled_or_eager(*args) -> tuple[Tensor, Optional[Tensor]]:
    """The compiled kernel, or the eager one where compilation failed (args as _eager's)."""
    result = _compiled(*args)
    return result if result is not None else _eager(*args)


class _FusedFocalLoss(torch.autograd.Function):
    """The summed loss of the eager or compiled kernel (`loss_and_grad`, args as _eager's): its
    forward computes loss and gradient in one pass (arithmetic-bound on CPU, so the
    transcendentals run once) and backward only scales the gradient, handed to autograd as the
    result (no copy). Only the inputs are saved: a second backward (retain_graph=True)
    recomputes from them."""

    @staticmethod
    def forward(ctx, loss_and_grad: Callable, logits: Tensor, targets: Optional[Tensor],
                classes: Optional[Tensor], row_weights: Optional[Tensor], alpha: Optional[float],
                gamma: float, t_pos: float, t_neg: float) -> Tensor:
        ctx.loss_and_grad, ctx.args = loss_and_grad, (alpha, gamma, t_pos, t_neg)
        ctx.logits_dtype = logits.dtype
        total, ctx.grad = loss_and_grad(logits, targets, classes, row_weights, *ctx.args,
                                        ctx.needs_input_grad[1])
        ctx.save_for_backward(logits, targets, classes, row_weights)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None  # ours alone now, so scaling it in place is safe
        if grad is None:
            _, grad = ctx.loss_and_grad(*ctx.saved_tensors, *ctx.args, True)
        # On CPU reading the scale costs nothing and saves a pass when it is 1 (loss.backward())
        if grad_output.device.type != "cpu" or grad_output.item() != 1.0:
            grad = grad.mul_(grad_output)
        return (None, grad.to(ctx.logits_dtype)) + (None,) * 7


def _auto_kernel(logits: Tensor) -> str:
    """"auto"'s rule: triton on CUDA (when it imports), compile on CPU for big tensors, eager
    otherwise; float64 always eager (the Triton kernel computes in float32, float64 checks)."""
    if logits.dtype == torch.float64:
        return "eager"
    if logits.device.type == "cuda":
        return "triton" if triton_focal_available(logits.device) else "eager"
    if logits.device.type == "cpu" and logits.numel() >= _COMPILE_MIN_ELEMENTS:
        return "compile"
    return "eager"


def select_focal_kernel(kernel: str, logits: Tensor) -> Callable[..., Tensor]:
    """The fused focal loss for logits like these (device, dtype, size), through `kernel`:
    "eager" (torch ops over cache-sized chunks), "compile" (torch.compile of the same math, one
    fused loop; eager with a warning where compilation fails), "triton" (CUDA) or "auto"
    (_auto_kernel). Returns f(logits (N, K), targets (N, K) | None, classes (N,) | None,
    row_weights (N,) | None, alpha, gamma, t_pos, t_neg) -> 0-dim sum; raises ConfigError if
    "triton" cannot run here. Called by FocalKernel, which checks the name."""
    if kernel == "auto":
        kernel = _auto_kernel(logits)
    if kernel != "triton":
        loss_and_grad = {"eager": _eager, "compile": _compiled_or_eager}[kernel]
        return functools.partial(_FusedFocalLoss.apply, loss_and_grad)
    if not triton_focal_available(logits.device) or logits.dtype == torch.float64:
        raise ConfigError(f"the triton focal-loss kernel needs a CUDA device, the triton "
                          f"package and float16/bfloat16/float32 logits (got {logits.device}, "
                          f"{logits.dtype}); set loss.cls.kernel (or kernel=) to auto, eager "
                          "or compile here")
    return TritonFocalLoss.apply


class FocalKernel:
    """The fused focal loss through `kernel` (see select_focal_kernel), chosen once per device,
    dtype and size class (all that "auto"'s rule reads) rather than on every call."""

    def __init__(self, kernel: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"focal-loss kernel must be one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.chosen: dict[tuple, Callable[..., Tensor]] = {}

    def __call__(self, logits: Tensor, *args) -> Tensor:
        key = (logits.device, logits.dtype, logits.numel() >= _COMPILE_MIN_ELEMENTS)
        if key not in self.chosen:
            self.chosen[key] = select_focal_kernel(self.kernel, logits)
        return self.chosen[key](logits, *args)


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "sum", *, kernel: str = "auto") -> Tensor:
    """torchvision's signature: logits and float targets in [0, 1] of the same shape (..., K).

    "sum" and "mean" run the fused loss (one pass, closed-form gradient, float32 math) through
    `kernel` (see select_focal_kernel); "none" returns the elementwise terms through autograd."""
    if reduction == "none":
        return binary_focal_terms(logits, upcast(targets), alpha, gamma)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    width = logits.shape[-1] if logits.dim() else 1
    total = FocalKernel(kernel)(logits.reshape(-1, width), targets.reshape(-1, width), None, None,
                                alpha, gamma, 1.0, 0.0)
    return total / max(1, logits.numel()) if reduction == "mean" else total


def sigmoid_focal_loss_with_classes(logits: Tensor, classes: Tensor, *, alpha: Optional[float] = 0.25,
                                    gamma: float = 2.0, label_smoothing: float = 0.0,
                                    row_weights: Optional[Tensor] = None,
                                    kernel: str | FocalKernel = "auto") -> Tensor:
    """Summed focal loss of logits (N, K) against integer classes (N,) in 0..K (K = background;
    rows to ignore get row weight 0), each row's terms multiplied by row_weights (N,). Fused: no
    one-hot tensor, one pass, closed-form gradient; `kernel` a name (see select_focal_kernel) or
    a FocalKernel that keeps its choices."""
    fused = kernel if isinstance(kernel, FocalKernel) else FocalKernel(kernel)
    t_neg, t_pos = label_smoothing / 2, 1 - label_smoothing / 2
    return fused(logits, None, classes, row_weights, alpha, gamma, t_pos, t_neg)

