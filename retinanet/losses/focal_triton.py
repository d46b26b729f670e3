"""Sigmoid focal loss and its closed-form gradient in one Triton pass over the logits.

Same math as the fused eager loss in focal.py (float32; formulas in its docstrings), but one
kernel reads each logit once and writes each gradient once, instead of a dozen elementwise torch
ops. Triton is imported only when the kernel is first needed, so this module imports without it.
Set TRITON_INTERPRET=1 before triton is imported to run the kernel on CPU tensors (slow; tests).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
from torch import Tensor

# One program per BLOCK elements of the flattened (N, K) logits: 8 elements a thread at 8 warps,
# enough in flight to stream memory, and few enough programs that their partial sums are cheap.
_BLOCK = 2048
_NUM_WARPS = 8


def triton_focal_available(device: torch.device) -> bool:
    """True when triton imports and `device` is CUDA, or, with TRITON_INTERPRET=1 in the
    environment, for any device (the interpreter runs on CPU tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _focal_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, t_ptr, cls_ptr, w_ptr, grad_ptr, partial_ptr, numel, alpha, gamma, t_pos,
               t_neg, K: tl.constexpr, GAMMA_MODE: tl.constexpr, HAS_ALPHA: tl.constexpr,
               HAS_W: tl.constexpr, HAS_CLASSES: tl.constexpr, WRITE_GRAD: tl.constexpr,
               BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        row = offs // K  # K is constexpr: a multiply-shift, not a division
        if HAS_CLASSES:
            # neighbouring elements share a row, so these gathers hit the same cache lines
            cls = tl.load(cls_ptr + row, mask=mask, other=-1)
            t = tl.where(cls == offs - row * K, t_pos, t_neg)
        else:
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # one exp serves both the sigmoid and the softplus, each stable for any sign of x
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        inv = 1.0 / u
        p = tl.where(x >= 0, inv, e * inv)
        # log(u) alone loses e's digits to the rounding of u (6e-4 relative at e = 1e-4);
        # log(u) e / (u - 1) cancels that rounding (u - 1 is exact): log1p to a few ulps. Below
        # 1e-4 the series; the floor keeps the discarded side free of 0 / 0.
        log1p_e = tl.log(u) * (e / tl.maximum(u - 1.0, 1e-30))
        log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), log1p_e)
        ce = tl.maximum(x, 0.0) + log1p_e - t * x
        a = 1.0 - 2.0 * t
        m = p * a + t  # 1 - p_t
        if GAMMA_MODE == 0:
            term = ce
            g = p - t
        elif GAMMA_MODE == 2:
            mod = m * m
            term = ce * mod
            g = (p - t) * mod + ce * (2.0 * m) * a * (p * (1.0 - p))
        else:
            mod = tl.where(m > 0, tl.exp(gamma * tl.log(m)), 0.0)
            # m^(gamma - 1) is inf at m = 0 for gamma < 1; clamped to float32 tiny (as in the
            # eager version) it stays finite and meets p (1 - p) = 0 there
            dmod = gamma * tl.exp((gamma - 1.0) * tl.log(tl.maximum(m, 1.17549435e-38)))
            term = ce * mod
            g = (p - t) * mod + ce * dmod * a * (p * (1.0 - p))
        if HAS_ALPHA:
            alpha_t = t * (2.0 * alpha - 1.0) + (1.0 - alpha)
            term = term * alpha_t
            g = g * alpha_t
        if HAS_W:
            w = tl.load(w_ptr + row, mask=mask, other=0.0).to(tl.float32)
            term = term * w
            g = g * w
        if WRITE_GRAD:
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        # a partial per program, summed by torch afterwards: deterministic, unlike atomics
        tl.store(partial_ptr + pid, tl.sum(tl.where(mask, term, 0.0), axis=0))

    return kernel


def focal_loss_triton(logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
                      row_weights: Optional[Tensor], grad_out: Optional[Tensor],
                      alpha: Optional[float], gamma: float, t_pos: float, t_neg: float) -> Tensor:
    """Summed sigmoid focal loss of logits (N, K) (float16 / bfloat16 / float32, math in float32).

    Exactly one of `targets` (N, K) float (soft binary targets) or `classes` (N,) int64 in 0..K
    (t = t_pos at k == classes[n], else t_neg; K or any value < 0 means background). `row_weights`
    (N,) scales each row's terms (0 ignores the row). `grad_out`, a preallocated (N, K) float32 or
    logits-dtype tensor, receives d(sum)/d(logits); None skips the gradient. alpha None or < 0: no
    balancing. Returns the 0-dim float32 sum, deterministic (no atomics).
    """
    if (targets is None) == (classes is None):
        raise ValueError("pass exactly one of targets (N, K) and classes (N,)")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    numel = logits.numel()
    if numel >= 2 ** 31:
        raise ValueError("focal_loss_triton indexes with int32: N * K must be below 2**31")
    if grad_out is not None and (grad_out.shape != logits.shape or not grad_out.is_contiguous()):
        raise ValueError("grad_out must be a contiguous tensor of the logits' shape")
    if numel == 0:
        if grad_out is not None:
            grad_out.zero_()
        return logits.new_zeros((), dtype=torch.float32)
    logits = logits.contiguous()
    has_classes = classes is not None
    # unused pointers get the logits: the constexpr switches compile their loads away
    targets = logits if targets is None else targets.contiguous()
    classes = logits if classes is None else classes.contiguous()
    weights = logits if row_weights is None else row_weights.contiguous()
    num_blocks = (numel + _BLOCK - 1) // _BLOCK
    partials = torch.empty(num_blocks, dtype=torch.float32, device=logits.device)
    has_alpha = alpha is not None and alpha >= 0
    gamma_mode = 0 if gamma == 0 else 2 if gamma == 2 else 1
    kernel = _focal_kernel()
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        kernel[(num_blocks,)](
            logits, targets, classes, weights, logits if grad_out is None else grad_out, partials,
            numel, float(alpha) if has_alpha else 0.0, float(gamma), float(t_pos), float(t_neg),
            K=num_classes, GAMMA_MODE=gamma_mode, HAS_ALPHA=has_alpha,
            HAS_W=row_weights is not None, HAS_CLASSES=has_classes,
            WRITE_GRAD=grad_out is not None, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return partials.sum(dtype=torch.float64).float()  # as the eager kernel: no float32 drift

