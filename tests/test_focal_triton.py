"""The Triton focal loss kernel against the eager reference: on CPU through the Triton interpreter
(in a subprocess, since TRITON_INTERPRET must be set before triton is imported) and on CUDA."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retinanet.losses.focal import binary_focal_terms
from retinanet.losses.focal_triton import compile_kernel, focal_loss_triton, triton_focal_available

HAS_TRITON = importlib.util.find_spec("triton") is not None
REPO_ROOT = Path(__file__).resolve().parents[1]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (num_classes, targets, row weights, alpha, gamma, label smoothing, logits dtype, grad_out dtype)
# targets: "classes" (N,) ints or "float" (N, K) soft targets; grad_out dtype None: no gradient.
CASES = [
    (80, "classes", True, 0.25, 2.0, False, F32, F32),
    (80, "classes", False, 0.25, 2.0, False, F32, F32),
    (80, "classes", True, None, 2.0, False, F32, F32),
    (80, "classes", True, 0.25, 0.0, False, F32, F32),
    (80, "classes", True, 0.25, 1.5, False, F32, F32),
    (80, "classes", True, 0.25, 0.5, False, F32, F32),
    (80, "classes", True, 0.25, 2.0, True, F32, F32),
    (80, "classes", True, 0.25, 0.5, True, F32, F32),
    (80, "classes", True, 0.25, 2.0, False, F16, F32),
    (80, "classes", True, 0.25, 2.0, False, BF16, F32),
    (80, "classes", True, 0.25, 2.0, False, F32, None),
    (80, "classes", True, 0.25, 2.0, False, F16, F16),
    (80, "float", False, 0.25, 2.0, False, F32, F32),
    (80, "float", True, None, 1.5, False, F32, F32),
    (80, "float", True, 0.25, 0.0, False, BF16, F32),
    (80, "float", True, 0.25, 0.5, False, F16, None),
    (1, "classes", True, 0.25, 2.0, False, F32, F32),
    (1, "classes", False, None, 1.5, True, F16, F32),
    (1, "float", True, 0.25, 2.0, False, F32, F32),
]


def _inputs(num_rows: int, num_classes: int, case, device, seed: int):
    """Logits (N, K) with some extreme entries (±30, ±100), classes (N,) in -1..K, soft targets
    (N, K) and row weights (N,) with zeros (ignored rows)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = case[6]
    logits = torch.randn(num_rows, num_classes, generator=gen) * 4
    extreme = torch.tensor([30.0, -30.0, 100.0, -100.0])
    picks = torch.randint(0, 4, (num_rows, num_classes), generator=gen)
    rare = torch.rand(num_rows, num_classes, generator=gen) < 0.05
    logits = torch.where(rare, extreme[picks], logits)
    classes = torch.randint(-1, num_classes + 1, (num_rows,), generator=gen)
    targets = torch.rand(num_rows, num_classes, generator=gen)
    hard = torch.rand(num_rows, num_classes, generator=gen) < 0.5  # half exactly 0 or 1
    targets = torch.where(hard, targets.round(), targets)
    weights = torch.rand(num_rows, generator=gen) * (torch.rand(num_rows, generator=gen) > 0.2)
    return [v.to(device) for v in (logits.to(dtype), classes, targets, weights)]


def check_case(case, num_rows: int, device, seed: int = 0) -> None:
    """Kernel vs autograd through binary_focal_terms in float64 (on the upcast logits).

    What float32 promises here: each element is ~20 roundings from its logit, relative to the
    factors (one exp, the log1p series, products; focal_triton.py), ~30 u; the subtractions
    that cancel (ce = max(x, 0) + log1p(e) - t x, m = 1 - p_t, p - t) lose only absolute
    precision, where their term is small next to the largest. Hence 1e-5 (168 u) relative
    element by element, plus 1e-6 (17 u) of the largest for those cancellations and for float32
    underflow. Half-precision gradients are rounded once more when stored (u of their dtype;
    2 eps = 4 u). The loss: block sums of 2048 terms by a tree (11 roundings), then float64:
    ~40 u of the (nonnegative) total, within 1e-5."""
    num_classes, kind, use_w, alpha, gamma, smooth, _, grad_dtype = case
    logits, classes, targets, weights = _inputs(num_rows, num_classes, case, device, seed)
    t_pos, t_neg = (0.95, 0.05) if smooth else (1.0, 0.0)
    weights = weights if use_w else None
    if kind == "classes":
        hit = classes[:, None] == torch.arange(num_classes, device=device)
        t32 = torch.where(hit, t_pos, t_neg)  # float32, as the kernel sees t_pos / t_neg
    else:
        t32 = targets * (t_pos - t_neg) + t_neg
    grad = None if grad_dtype is None else torch.full_like(logits, float("nan"), dtype=grad_dtype)
    loss = focal_loss_triton(logits, t32 if kind == "float" else None,
                             classes if kind == "classes" else None, weights, grad,
                             alpha, gamma, t_pos, t_neg)
    x64 = logits.double().requires_grad_()
    terms = binary_focal_terms(x64, t32.double(), alpha, gamma)
    ref_loss = (terms if weights is None else terms * weights.double()[:, None]).sum()
    ref_loss.backward()
    # where m = 1 - p_t rounds to 0 and gamma < 1, autograd meets inf * 0 = nan; the derivative
    # tends to 0 there (the term is ~exp(-(1 + gamma)|x|)), which the kernel's clamp also gives
    ref = torch.where(x64.grad.isnan(), 0.0, x64.grad)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (case, loss, ref_loss)
    if grad is None:
        return
    assert grad.dtype == grad_dtype
    ref = ref if grad_dtype == torch.float32 else ref.to(grad_dtype).double()
    rtol = 1e-5 if grad_dtype == torch.float32 else 2 * torch.finfo(grad_dtype).eps
    err = (grad.double() - ref).abs()
    bound = rtol * ref.abs() + 1e-6 * ref.abs().max()
    assert bool((err <= bound).all()), (case, (err - bound).max().item())


def check_negative_tail(device) -> None:
    """Background logits (1000, 2) in [-25, 0] (so terms ~ p^3 stay float32 normals), gamma 2,
    no alpha: the gradient p^3 + 2 ce p^2 (1 - p) must keep float32 relative precision element by
    element, which a softplus computed as a plain log(1 + exp(x)) misses (6e-4 near x = -9; the
    absolute tolerance of check_case would hide it)."""
    x = torch.linspace(-25.0, 0.0, 2000, device=device).reshape(-1, 2)
    grad = torch.empty_like(x)
    loss = focal_loss_triton(x, None, torch.full((1000,), 2, device=device), None, grad,
                             None, 2.0, 1.0, 0.0)
    x64 = x.double().requires_grad_()
    ref_loss = binary_focal_terms(x64, 0.0, None, 2.0).sum()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    torch.testing.assert_close(grad.double(), x64.grad, rtol=1e-5, atol=0.0)  # as check_case, no cancellation


def check_autograd(device, num_rows: int) -> None:
    """The autograd function on the triton kernel (gradient computed in backward, times
    grad_output read on the device) against the eager kernel: a loss scaled by 3 and one
    backpropagated twice (retain_graph), in float32 and float16, and the scaled gradient alone
    through focal_loss_triton's grad_scale.

    Bounds: 3 g + g against (3 g) 4 / 3 rounds three times in the gradient's dtype (1e-6 is 17 u
    of float32; 2e-3 is 4 u of float16); triton against eager, two float32 formulas each within
    ~30 u of the exact loss and gradient (see check_case): 1e-5 and, for float16 gradients, their
    rounding; scaled by -0.5 (exact) in another compiled variant of the kernel, whose multiply-adds
    may fuse differently: a few u."""
    from retinanet.losses.focal import sigmoid_focal_loss_with_classes
    case = (80, "classes", True, 0.25, 2.0, False, F32, F32)
    logits, classes, _, weights = _inputs(num_rows, 80, case, device, seed=7)
    for dtype in (F32, F16):
        grads = {}
        for kernel in ("triton", "eager"):
            x = logits.detach().to(dtype, copy=True).requires_grad_()
            loss = sigmoid_focal_loss_with_classes(x, classes, row_weights=weights, kernel=kernel)
            (loss * 3).backward(retain_graph=True)
            first = x.grad.clone()
            loss.backward()  # the second backward adds 1 x the gradient
            assert x.grad.dtype == dtype
            torch.testing.assert_close(x.grad.float(), first.float() * (4 / 3),
                                       rtol=2e-3 if dtype == F16 else 1e-6, atol=1e-6)
            grads[kernel] = (loss.detach(), first)
        torch.testing.assert_close(grads["triton"][0], grads["eager"][0], rtol=1e-5, atol=0.0)
        rtol = 1e-5 if dtype == F32 else 2 * torch.finfo(F16).eps
        torch.testing.assert_close(grads["triton"][1].float(), grads["eager"][1].float(), rtol=rtol, atol=1e-6)
    plain, scaled = torch.empty_like(logits), torch.empty_like(logits)
    focal_loss_triton(logits, None, classes, weights, plain, 0.25, 2.0, 1.0, 0.0)
    assert focal_loss_triton(logits, None, classes, weights, scaled, 0.25, 2.0, 1.0, 0.0,
                             grad_scale=torch.tensor(-0.5, device=device), need_loss=False) is None
    torch.testing.assert_close(scaled, plain * -0.5, rtol=1e-6, atol=0.0)


def run_cases(device, num_rows: int) -> int:
    for seed, case in enumerate(CASES):
        check_case(case, num_rows, device, seed)
    check_negative_tail(device)
    check_autograd(device, num_rows)
    return len(CASES)


def test_available_without_triton():
    """With triton blocked from importing, the module still imports and reports unavailable."""
    code = ("import sys; sys.modules['triton'] = None; import torch\n"
            "from retinanet.losses.focal_triton import triton_focal_available as ok\n"
            "print(ok(torch.device('cuda')), ok(torch.device('cpu')))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False"]
    assert triton_focal_available(torch.device("cuda")) == HAS_TRITON


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_focal_interpreter_cpu():
    """Every case on CPU under the Triton interpreter; N = 333 is not a multiple of the block."""
    code = (f"import sys; sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})\n"
            "import torch, test_focal_triton as t\n"
            "from retinanet.losses.focal_triton import triton_focal_available\n"
            "assert triton_focal_available(torch.device('cpu'))\n"
            "print('checked', t.run_cases('cpu', 333))")
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"checked {len(CASES)}" in out.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernel_builds_for_the_gpu_without_one():
    """The GPU compiler itself (ptxas ships with triton), which the interpreter above never runs,
    on the variants that get launched: the autograd forward and backward, loss and gradient in
    one pass, soft targets with row weights and gamma 1.5, no alpha with gamma 0 and one class.
    Each builds for sm_90 with no local memory (a register spill would be a slow kernel)."""
    variants = [{}, {"write_grad": True, "grad_scale": True, "write_loss": False}, {"write_grad": True},
                {"classes": False, "row_weights": True, "gamma": 1.5, "write_grad": True},
                {"alpha": False, "gamma": 0.0, "num_classes": 1}]
    for switches in variants:
        kernel = compile_kernel(90, **switches)
        assert kernel.asm["cubin"], switches
        assert ".entry kernel" in kernel.asm["ptx"] and ".local" not in kernel.asm["ptx"], switches


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
def test_triton_focal_cuda():
    """Every case compiled for the GPU at a training-sized N (two images' anchors, 2 x 76725)."""
    assert triton_focal_available(torch.device("cuda"))
    assert run_cases("cuda", 2 * 76725) == len(CASES)


def _kernel_timing(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/focal_kernel_timing.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_kernel_timing_script_says_it_needs_cuda():
    out = _kernel_timing()
    assert out.returncode == 2 and "needs a CUDA device" in out.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
def test_kernel_timing_script_on_cuda():
    out = _kernel_timing("--repeats", "2", "--configs", "2048x8", "1024x4")
    assert out.returncode == 0, out.stderr[-3000:]
    for config in ("2048x8", "1024x4"):
        assert re.search(rf"\| {config} \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", out.stdout), out.stdout
