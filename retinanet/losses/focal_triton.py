"""Sigmoid focal loss and its closed-form gradient in one Triton pass over the logits.

The math of focal.focal_terms_and_grad restated in Triton (float32), the reference its tests
compare against: one kernel reads each logit once and writes each gradient once, instead of a
dozen elementwise torch ops. The gradient can be scaled by a 0-dim device tensor read inside the
kernel (autograd's grad_output), so backward needs neither a host sync nor a second pass to apply
it. Triton is imported only when the kernel is first needed, so this module imports without it.
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
# Launched with enable_fp_fusion=True (multiply-adds fused, the series is a chain of them), which
# Triton 3.10 stops taking as its default.
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
    def kernel(x_ptr, t_ptr, cls_ptr, w_ptr, grad_ptr, scale_ptr, partial_ptr, numel, alpha, gamma,
               t_pos, t_neg, K: tl.constexpr, GAMMA_MODE: tl.constexpr, HAS_ALPHA: tl.constexpr,
               HAS_W: tl.constexpr, HAS_CLASSES: tl.constexpr, WRITE_GRAD: tl.constexpr,
               HAS_SCALE: tl.constexpr, WRITE_LOSS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        row = offs // K  # K is constexpr: a multiply-shift, not a division
        if HAS_CLASSES:
            # neighbouring elements share a row, so these gathers hit the same cache lines;
            # compared in int32 (classes are in -1..K): 4 instructions a logit fewer than int64
            cls = tl.load(cls_ptr + row, mask=mask, other=-1).to(tl.int32)
            t = tl.where(cls == offs - row * K, t_pos, t_neg)
        else:
            t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # Bound by instruction issue rather than memory, so each instruction a logit counts
        # (scripts/kernel_report.py): one exp serves the sigmoid and the softplus, each stable
        # for any sign of x; one division gives both 1 / (1 + e) and e / (2 + e), and log1p(e) =
        # 2 atanh(e / (2 + e)) is a 7-term series in it (as focal._LOG1P_SERIES), cheaper than
        # tl.log's libdevice call and a second division.
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        v = 2.0 + e
        d = 1.0 / (u * v)
        inv = v * d  # 1 / (1 + e)
        q = e * u * d  # e / (2 + e), in [0, 1/3]
        q2 = q * q
        series = 2.0 / 13.0
        series = series * q2 + 2.0 / 11.0
        series = series * q2 + 2.0 / 9.0
        series = series * q2 + 2.0 / 7.0
        series = series * q2 + 2.0 / 5.0
        series = series * q2 + 2.0 / 3.0
        series = series * q2 + 2.0
        log1p_e = q * series
        p = tl.where(x >= 0, inv, e * inv)
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
            # Python formula) it stays finite and meets p (1 - p) = 0 there
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
            if HAS_SCALE:
                g = g * tl.load(scale_ptr).to(tl.float32)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        if WRITE_LOSS:
            # a partial per program, summed by torch afterwards: deterministic, unlike atomics
            tl.store(partial_ptr + pid, tl.sum(tl.where(mask, term, 0.0), axis=0))

    return kernel


def focal_loss_triton(logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
                      row_weights: Optional[Tensor], grad_out: Optional[Tensor],
                      alpha: Optional[float], gamma: float, t_pos: float, t_neg: float,
                      grad_scale: Optional[Tensor] = None, need_loss: bool = True) -> Optional[Tensor]:
    """Summed sigmoid focal loss of logits (N, K) (float16 / bfloat16 / float32, math in float32).

    Exactly one of `targets` (N, K) float (soft binary targets) or `classes` (N,) int64 in 0..K
    (t = t_pos at k == classes[n], else t_neg; K or any value < 0 means background). `row_weights`
    (N,) scales each row's terms (0 ignores the row). `grad_out`, a preallocated (N, K) float32 or
    logits-dtype tensor, receives d(sum)/d(logits), times `grad_scale` (a one-element tensor on
    the logits' device) when given; None skips the gradient. alpha None or < 0: no balancing.
    Returns the 0-dim float32 sum, deterministic (no atomics), or None with need_loss=False
    (a backward pass: the gradient alone, no partial sums written).
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
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.device != logits.device):
        raise ValueError("grad_scale must be a one-element tensor on the logits' device")
    if numel == 0:
        if grad_out is not None:
            grad_out.zero_()
        return logits.new_zeros((), dtype=torch.float32) if need_loss else None
    logits = logits.contiguous()
    has_classes = classes is not None
    # unused pointers get the logits: the constexpr switches compile their loads away
    targets = logits if targets is None else targets.contiguous()
    classes = logits if classes is None else classes.contiguous()
    weights = logits if row_weights is None else row_weights.contiguous()
    num_blocks = (numel + _BLOCK - 1) // _BLOCK
    partials = torch.empty(num_blocks if need_loss else 0, dtype=torch.float32, device=logits.device)
    has_alpha = alpha is not None and alpha >= 0
    gamma_mode = 0 if gamma == 0 else 2 if gamma == 2 else 1
    kernel = _focal_kernel()
    with torch.cuda.device(logits.device) if logits.is_cuda else contextlib.nullcontext():
        kernel[(num_blocks,)](
            logits, targets, classes, weights, logits if grad_out is None else grad_out,
            logits if grad_scale is None else grad_scale, partials, numel,
            float(alpha) if has_alpha else 0.0, float(gamma), float(t_pos), float(t_neg),
            K=num_classes, GAMMA_MODE=gamma_mode, HAS_ALPHA=has_alpha,
            HAS_W=row_weights is not None, HAS_CLASSES=has_classes,
            WRITE_GRAD=grad_out is not None, HAS_SCALE=grad_scale is not None,
            WRITE_LOSS=need_loss, BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=True)
    if not need_loss:
        return None
    return partials.sum(dtype=torch.float64).float()  # as the eager kernel: no float32 drift


class TritonFocalLoss(torch.autograd.Function):
    """focal_loss_triton under autograd, args (logits, targets, classes, row_weights, alpha, gamma,
    t_pos, t_neg): forward only reads the logits for the loss; backward reads them again and
    writes the gradient already times grad_output, read on the device (no host sync). One (N, K)
    pass fewer than loss and gradient in forward then a scaling pass, and no (N, K) tensor held
    between forward and backward; a second backward (retain_graph=True) works the same way."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Optional[Tensor], classes: Optional[Tensor],
                row_weights: Optional[Tensor], alpha: Optional[float], gamma: float,
                t_pos: float, t_neg: float) -> Tensor:
        ctx.args = (alpha, gamma, t_pos, t_neg)
        ctx.save_for_backward(logits, targets, classes, row_weights)
        return focal_loss_triton(logits, targets, classes, row_weights, None, *ctx.args)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        logits, targets, classes, row_weights = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        focal_loss_triton(logits, targets, classes, row_weights, grad, *ctx.args,
                          grad_scale=grad_output, need_loss=False)
        return (grad,) + (None,) * 7


def compile_kernel(arch: int = 90, *, num_classes: int = 80, gamma: float = 2.0,
                   alpha: bool = True, row_weights: bool = False, classes: bool = True,
                   write_grad: bool = False, grad_scale: bool = False, write_loss: bool = True):
    """The kernel compiled ahead of time for CUDA compute capability `arch` (90: H100), with no
    GPU needed: triton ships its own ptxas. The switches mirror focal_loss_triton's (float32
    logits, int64 classes); the defaults are the autograd forward, write_grad + grad_scale
    without write_loss its backward. Returns triton's compiled kernel (.asm["ptx"], ["cubin"]).

    The Triton interpreter of the CPU tests runs the kernel's Python, not the GPU compiler: this
    is how a CPU machine checks that the kernel builds, and how scripts/kernel_report.py counts
    its machine instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = _focal_kernel()
    types = {"x_ptr": "*fp32", "t_ptr": "*fp32", "cls_ptr": "*i64", "w_ptr": "*fp32",
             "grad_ptr": "*fp32", "scale_ptr": "*fp32", "partial_ptr": "*fp32", "numel": "i32",
             "alpha": "fp32", "gamma": "fp32", "t_pos": "fp32", "t_neg": "fp32"}
    constants = {"K": num_classes, "GAMMA_MODE": 0 if gamma == 0 else 2 if gamma == 2 else 1,
                 "HAS_ALPHA": alpha, "HAS_W": row_weights, "HAS_CLASSES": classes,
                 "WRITE_GRAD": write_grad, "HAS_SCALE": grad_scale, "WRITE_LOSS": write_loss,
                 "BLOCK": _BLOCK}
    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": _NUM_WARPS, "enable_fp_fusion": True})
