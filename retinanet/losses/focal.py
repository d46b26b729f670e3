"""Sigmoid focal loss (Lin et al., 2017): FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t).

(1 - p_t)^gamma down-weights easy examples, so the flood of easy background anchors cannot drown
the rare hard ones; alpha_t balances positives (alpha) against negatives (1 - alpha). Computed in
float32 whatever the input dtype: fp16 log() and small powers underflow.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compiling import CompiledOrNone
from ..errors import ConfigError
from .focal_triton import focal_loss_triton, triton_focal_available


def upcast(tensor: Tensor) -> Tensor:
    """float16 / bfloat16 -> float32; float32 and float64 stay as they are."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def binary_focal_terms(logits: Tensor, targets: Tensor | float, alpha: Optional[float],
                       gamma: float) -> Tensor:
    """Elementwise -alpha_t (1 - p_t)^gamma log(p_t) for (soft) binary targets in [0, 1].

    With p = sigmoid(x): p_t = t p + (1 - t)(1 - p), alpha_t = t alpha + (1 - t)(1 - alpha), and
    the cross-entropy -t log p - (1 - t) log(1 - p) = t softplus(-x) + (1 - t) softplus(x), which is
    finite for any logit. `targets` may be a scalar (broadcast). alpha None (or < 0): no balancing.
    """
    logits = upcast(logits)
    prob = logits.sigmoid()
    ce = targets * F.softplus(-logits) + (1 - targets) * F.softplus(logits)
    loss = ce if gamma == 0 else ce * (1 - (targets * prob + (1 - targets) * (1 - prob))).pow(gamma)
    if alpha is not None and alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


# Elements per chunk of the eager loss (128 K: ~1600 rows at K = 80), so that the dozen
# elementwise temporaries of a chunk stay in cache instead of streaming N x K tensors through
# memory (2^16 and 2^18 measured slower on 2 cores).
_CHUNK_ELEMENTS = 1 << 17
# On a GPU (without Triton) chunks only bound the temporaries: a Python loop over cache-sized
# chunks cost 17 ms at 2 x 76725 x 80 on an H100, launch overhead for ~100 chunks of a dozen ops.
_GPU_CHUNK_ELEMENTS = 1 << 24

KERNELS = ("auto", "eager", "compile", "triton")


# log1p(e) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = e / (2 + e) <= 1/3 for e <= 1:
# the Horner coefficients 2/(2j + 1) of s^2, highest first. Seven terms leave < 2e-8 relative.
_LOG1P_SERIES = tuple(2.0 / (2 * j + 1) for j in range(6, -1, -1))


def _sigmoid_and_softplus(x: Tensor, one_exp: bool) -> tuple[Tensor, Tensor]:
    """(sigmoid(x), softplus(x)). one_exp, for the compiled loop, which is bound by its
    transcendentals: both from e = exp(-|x|), sigmoid = 1/(1+e) or e/(1+e), softplus =
    max(x, 0) + log1p(e), with one division for 1/(1+e) and e/(2+e), and log1p(e) as a short
    series (vectorised log1p costs three times exp here: 16 -> 11 ms for the fused focal loss at
    2 x 76725 x 80 on 2 cores; <= 4e-7 relative error against float64, torch's own is 1.2e-7).
    Eager runs torch's two kernels instead (fewer passes)."""
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


def _loss_and_grad(x: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
                   row_weights: Optional[Tensor], alpha: Optional[float], gamma: float,
                   t_pos: float, t_neg: float, need_grad: bool,
                   one_exp: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """Sum of focal terms and its gradient for logits x (n, K), against float targets (n, K) or
    integer classes (n,) (t = t_pos at k == class, else t_neg), rows weighted by row_weights (n,).

    With p = sigmoid(x), ce = softplus(x) - t x, a = 1 - 2t, m = 1 - p_t = p a + t,
    alpha_t = alpha t + (1 - alpha)(1 - t): FL = alpha_t ce m^gamma and
    dFL/dx = alpha_t [(p - t) m^gamma + ce gamma m^(gamma - 1) a p (1 - p)].
    Returns (0-dim sum, (n, K) gradient or None), in float32 (float64 stays). The eager kernel
    runs it per chunk for float targets (class targets take _negative_terms); torch.compile fuses
    it (one_exp=True) into one loop over the whole tensor; focal_triton.py is the same math by hand.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    if classes is not None:  # int32: half the lanes of an int64 compare in the compiled loop
        class_ids = torch.arange(x.shape[1], device=x.device, dtype=torch.int32)
        t = torch.where(classes.to(torch.int32)[:, None] == class_ids, t_pos, t_neg).to(dtype)
    else:
        t = targets.to(dtype)
    p, ce = _sigmoid_and_softplus(x, one_exp)
    ce = ce.sub_(t * x)
    a = 1.0 - 2.0 * t
    m = p * a + t
    if gamma == 0:
        mod, dmod = None, None
    elif gamma == 2:
        mod, dmod = m * m, 2.0 * m
    else:
        mod = m.pow(gamma)
        # m^(gamma - 1) at m = 0 is inf for gamma < 1; the term is 0 there (p(1-p) = 0)
        dmod = gamma * m.clamp(min=torch.finfo(dtype).tiny).pow(gamma - 1)
    weight = t * (2 * alpha - 1) + (1 - alpha) if alpha is not None and alpha >= 0 else None
    if row_weights is not None:
        w = row_weights[:, None].to(dtype)
        weight = w if weight is None else weight * w
    loss = ce if mod is None else ce * mod
    # Rows summed in the working dtype (K terms each), rows in a float64 accumulator: a float32
    # running sum over millions of terms drifts by ~1e-6, and a per-element float64 add halves
    # the compiled loop's speed.
    total = (loss if weight is None else loss * weight).sum(dim=1).sum(dtype=torch.float64).to(dtype)
    if not need_grad:
        return total, None
    g = p - t
    if mod is not None:
        g = g.mul_(mod).add_(ce.mul_(dmod).mul_(a).mul_(p * (1 - p)))
    if weight is not None:
        g = g.mul_(weight)
    return total, g


def _one_exp_loss_and_grad(*args) -> tuple[Tensor, Optional[Tensor]]:
    """_loss_and_grad with one_exp=True: the function torch.compile traces."""
    return _loss_and_grad(*args, one_exp=True)


# One fused loop, no (n, K) temporaries. Past dynamo's recompile limit (many loss variants in one
# process) torch would silently run the whole-tensor math eagerly, (n, K) temporaries by the
# dozen: made an error, so that _eager's chunked kernel runs instead.
_compiled = CompiledOrNone(_one_exp_loss_and_grad, "loss.cls.kernel", dynamic=True,
                           dynamo_config={"fail_on_recompile_limit_hit": True})


def _eager(logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
           row_weights: Optional[Tensor], alpha: Optional[float], gamma: float, t_pos: float,
           t_neg: float, need_grad: bool) -> tuple[Tensor, Optional[Tensor]]:
    """The loss over row chunks that fit in cache; the gradient is the only (N, K) tensor.

    With class targets every entry is first scored as a negative (target t_neg: a scalar, so
    about half the elementwise passes of the general form), then the one positive entry of each
    foreground row is corrected on its own (a (P,) vector)."""
    num_rows, num_classes = logits.shape
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = torch.empty(logits.shape, dtype=dtype, device=logits.device) if need_grad else None
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    chunk_elements = _CHUNK_ELEMENTS if logits.device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    chunk = max(1, chunk_elements // max(1, num_classes))
    for start in range(0, num_rows, chunk):
        rows = slice(start, min(start + chunk, num_rows))
        weights = None if row_weights is None else row_weights[rows]
        if classes is not None:
            total += _negative_terms(logits[rows].to(dtype), weights, alpha, gamma, t_neg,
                                     grad[rows] if need_grad else None)
            continue
        part, g = _loss_and_grad(logits[rows], targets[rows], None, weights, alpha, gamma,
                                 t_pos, t_neg, need_grad)
        total += part
        if need_grad:
            grad[rows] = g
    if classes is not None:
        fg_rows = torch.nonzero((classes >= 0) & (classes < num_classes), as_tuple=True)[0]
        fg_classes = classes[fg_rows]
        x = logits[fg_rows, fg_classes][:, None]
        weights = None if row_weights is None else row_weights[fg_rows]
        positive, g = _loss_and_grad(x, torch.full_like(x, t_pos, dtype=dtype), None, weights,
                                     alpha, gamma, t_pos, t_neg, need_grad)
        negative, _ = _loss_and_grad(x, torch.full_like(x, t_neg, dtype=dtype), None, weights,
                                     alpha, gamma, t_pos, t_neg, False)
        total += positive.double() - negative.double()
        if need_grad:
            grad[fg_rows, fg_classes] = g[:, 0]
    return total.to(dtype), grad


def _negative_terms(x: Tensor, row_weights: Optional[Tensor], alpha: Optional[float], gamma: float,
                    t: float, grad_out: Optional[Tensor]) -> Tensor:
    """_loss_and_grad for one scalar target t everywhere: x (n, K) float, row_weights (n,) or None.
    Writes the gradient into grad_out (n, K) when given; returns the float64 sum."""
    p = torch.sigmoid(x)
    ce = F.softplus(x)
    if t:
        ce.sub_(x, alpha=t)
    a = 1.0 - 2.0 * t
    m = p if t == 0 else p.mul(a).add_(t)
    alpha_t = t * (2 * alpha - 1) + (1 - alpha) if alpha is not None and alpha >= 0 else 1.0
    if gamma == 0:
        mod = None
    elif gamma == 2:
        mod = m * m
    else:
        mod = m.pow(gamma)
    per_row_terms = ce if mod is None else ce * mod
    per_row = per_row_terms.sum(dim=1, dtype=torch.float64)
    total = (per_row if row_weights is None else per_row * row_weights.double()).sum() * alpha_t
    if grad_out is None:
        return total
    # dFL/dx = alpha_t w [(p - t) m^gamma + ce gamma m^(gamma - 1) a p (1 - p)]
    if t == 0 and gamma == 2:  # the default: m = p, so with u = ce p^2 that is p^3 + 2u (1 - p)
        g = torch.mul(p, mod).addcmul_(per_row_terms, torch.rsub(p, 1.0), value=2.0)  # no cancellation
    else:
        g = p.sub(t) if t else p.clone()
        if mod is not None:
            pq = torch.rsub(p, 1.0).mul_(p)
            if gamma == 2:
                g.mul_(mod).add_(ce.mul_(m).mul_(pq), alpha=2.0 * a)
            else:
                dmod = gamma * m.clamp(min=torch.finfo(x.dtype).tiny).pow(gamma - 1)
                g.mul_(mod).add_(ce.mul_(dmod).mul_(pq), alpha=a)
    scale = alpha_t if row_weights is None else (row_weights.to(x.dtype) * alpha_t)[:, None]
    torch.mul(g, scale, out=grad_out)
    return total


# From this size up, "auto" on CPU takes the compiled kernel: ~3x the eager one at RetinaNet scale
# (2 x 76725 x 80), while its one-time compilation (seconds, cached on disk by torch) is wasted on
# the small tensors of tests and toy datasets.
_COMPILE_MIN_ELEMENTS = 1 << 22


def _auto_kernel(logits: Tensor) -> str:
    """Triton on CUDA (when it imports), compile on CPU for big tensors, eager otherwise; float64
    always eager (the Triton kernel computes in float32, and float64 is for checking)."""
    if logits.dtype == torch.float64:
        return "eager"
    if logits.device.type == "cuda":
        return "triton" if triton_focal_available(logits.device) else "eager"
    if logits.device.type == "cpu" and logits.numel() >= _COMPILE_MIN_ELEMENTS:
        return "compile"
    return "eager"


def _resolve_kernel(kernel: str, logits: Tensor) -> str:
    """The kernel named in KERNELS that will run for these logits ("auto" resolved); raises if
    "triton" cannot run here."""
    if kernel not in KERNELS:
        raise ValueError(f"focal-loss kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = _auto_kernel(logits)
    if kernel == "triton" and (not triton_focal_available(logits.device) or logits.dtype == torch.float64):
        raise ConfigError(f"the triton focal-loss kernel needs a CUDA device, the triton "
                          f"package and float16/bfloat16/float32 logits (got {logits.device}, "
                          f"{logits.dtype}); set loss.cls.kernel (or kernel=) to auto, eager "
                          "or compile here")
    return kernel


def _focal_loss_and_grad(kernel: str, logits: Tensor, *args) -> tuple[Tensor, Optional[Tensor]]:
    """Loss and gradient with a resolved CPU-style kernel, "eager" or "compile" (args as
    _loss_and_grad's after logits)."""
    if kernel == "compile":
        result = _compiled(logits, *args)
        if result is not None:
            return result
    return _eager(logits, *args)


class _FusedFocalLoss(torch.autograd.Function):
    """sum_nk w_n * FL(x_nk, t_nk) for logits (N, K): the loss and its closed-form gradient (see
    _loss_and_grad). Targets are float (N, K) `targets` or integer `classes` (N,) (no one-hot
    tensor), with optional row weights (N,). Math in float32 for float16 / bfloat16 / float32
    logits (float64 stays).

    Where the gradient is computed depends on the device:
    - eager / compile (CPU, bound by arithmetic): forward computes loss and gradient in one pass
      and backward only scales the gradient (skipped when grad_output is 1, read for free on
      the CPU), so the transcendentals run once. Memory beyond the inputs: the (N, K) gradient,
      handed to autograd as the result (no copy).
    - triton (GPU): forward only reads the logits for the loss, and backward reads them again
      and writes the gradient already times grad_output (read on the device, no host sync):
      three (N, K) transfers instead of four with a scaling pass, and no (N, K) tensor held
      between forward and backward (H100: 47 + 44 us, against 54 + 35 for loss and gradient,
      then scaling).
    Only the inputs are saved: a second backward (retain_graph=True) recomputes from them.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
                row_weights: Optional[Tensor], alpha: Optional[float], gamma: float,
                t_pos: float, t_neg: float, kernel: str) -> Tensor:
        ctx.args = (alpha, gamma, t_pos, t_neg)
        ctx.kernel = _resolve_kernel(kernel, logits)
        ctx.logits_dtype = logits.dtype
        if ctx.kernel == "triton":
            total, ctx.grad = focal_loss_triton(logits, targets, classes, row_weights, None,
                                                *ctx.args), None
        else:
            total, ctx.grad = _focal_loss_and_grad(ctx.kernel, logits, targets, classes, row_weights,
                                                   *ctx.args, ctx.needs_input_grad[0])
        ctx.save_for_backward(logits, targets, classes, row_weights)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad, ctx.grad = ctx.grad, None  # ours alone now, so scaling it in place is safe
        logits, targets, classes, row_weights = ctx.saved_tensors if grad is None else (None,) * 4
        if ctx.kernel == "triton":
            grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
            focal_loss_triton(logits, targets, classes, row_weights, grad, *ctx.args,
                              grad_scale=grad_output, need_loss=False)
            return (grad,) + (None,) * 8
        if grad is None:
            _, grad = _focal_loss_and_grad(ctx.kernel, logits, targets, classes, row_weights,
                                           *ctx.args, True)
        # On CPU reading the scale costs nothing and saves a pass when it is 1 (loss.backward())
        if grad_output.device.type != "cpu" or grad_output.item() != 1.0:
            grad = grad.mul_(grad_output)
        return (grad.to(ctx.logits_dtype),) + (None,) * 8


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: Optional[float] = 0.25,
                       gamma: float = 2.0, reduction: str = "sum", *, kernel: str = "auto") -> Tensor:
    """torchvision's signature: logits and float targets in [0, 1] of the same shape (..., K).

    "sum" and "mean" run the fused loss (one pass, closed-form gradient, float32 math); "none"
    returns the elementwise terms through autograd. `kernel`: "auto" (Triton on CUDA when it
    imports; on CPU "compile" from 2^22 logits up, else "eager"), "eager" (torch ops over
    cache-sized chunks), "compile" (torch.compile of the same math: one fused loop, ~3x eager on
    CPU, compiled once per process; eager with a warning where compilation fails) or "triton"."""
    if reduction == "none":
        return binary_focal_terms(logits, upcast(targets), alpha, gamma)
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    width = logits.shape[-1] if logits.dim() else 1
    total = _FusedFocalLoss.apply(logits.reshape(-1, width), targets.reshape(-1, width), None, None,
                                  alpha, gamma, 1.0, 0.0, kernel)
    return total / max(1, logits.numel()) if reduction == "mean" else total


def sigmoid_focal_loss_with_classes(logits: Tensor, classes: Tensor, *, alpha: Optional[float] = 0.25,
                                    gamma: float = 2.0, label_smoothing: float = 0.0,
                                    row_weights: Optional[Tensor] = None, kernel: str = "auto") -> Tensor:
    """Summed focal loss of logits (N, K) against integer classes (N,) in 0..K (K = background;
    rows to ignore get row weight 0), each row's terms multiplied by row_weights (N,). Fused: no
    one-hot tensor, one pass, closed-form gradient; `kernel` as in sigmoid_focal_loss."""
    t_neg, t_pos = label_smoothing / 2, 1 - label_smoothing / 2
    return _FusedFocalLoss.apply(logits, None, classes, row_weights, alpha, gamma, t_pos, t_neg, kernel)


def sigmoid_focal_loss_per_anchor(logits: Tensor, classes: Tensor, *, alpha: Optional[float] = 0.25,
                                  gamma: float = 2.0, label_smoothing: float = 0.0) -> Tensor:
    """(N, K) logits, (N,) classes in 0..K (K = background) -> (N,) focal loss summed over classes.

    Every entry is scored as a negative (target eps/2); the N_pos entries (row, class) of positives
    are then corrected by (positive term - negative term), target 1 - eps/2. No one-hot tensor.
    (The autograd reference of sigmoid_focal_loss_with_classes, for per-anchor values.)
    """
    num_classes = logits.shape[-1]
    t_neg, t_pos = label_smoothing / 2, 1 - label_smoothing / 2
    per_anchor = binary_focal_terms(logits, t_neg, alpha, gamma).sum(dim=-1)
    rows = torch.nonzero(classes < num_classes, as_tuple=True)[0]
    pos_logits = logits[rows, classes[rows]]
    correction = binary_focal_terms(pos_logits, t_pos, alpha, gamma) - \
        binary_focal_terms(pos_logits, t_neg, alpha, gamma)
    return per_anchor.index_add(0, rows, correction)
