from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss as tv_focal

from retinanet.boxes import BoxCoder
from retinanet.errors import ConfigError
from retinanet.losses import (Matcher, RetinaNetCriterion, pad_targets, sigmoid_focal_loss,
                              sigmoid_focal_loss_with_classes)
from retinanet.losses.box import smooth_l1_loss
from retinanet.losses.focal import binary_focal_terms

from numerics import U32


class FocalReference:
    """torchvision's focal loss (the definition) in float64 on the given float32 / bfloat16 logits:
    `loss`, `grad`, `terms`, and bounds on what a float32 evaluation of the same loss may differ
    by from them (float32 focal losses differ from each other by rounding, nothing else: the loss
    is smooth, so no kink can flip).

    Per element: every factor of alpha_t ce m^gamma and of its derivative (p, 1 - p, m = 1 - p_t,
    ce, m^gamma, m^(gamma - 1), p (1 - p)) comes from the logit x within a few u of
    max(1, |x|, ce) (ce = softplus(x) - t x and 1 - p cancel, so those errors are absolute), each
    factor is at most that, and the formula is about 16 roundings and products of them:
    term_bound = 16 u alpha_t (1 + gamma)^2 (1 + |x| + ce) (times the row weight). The sum adds
    an inexact rounding only where both operands are nonzero, at most once per term, each within
    u of the (nonnegative) total: loss_bound = sum(term_bound) + (n + 1) u loss, the extra one
    for the final cast."""

    def __init__(self, logits, targets, alpha=0.25, gamma=2.0, row_weights=None):
        x = logits.detach().double().requires_grad_()
        t = targets.double()
        weights = torch.ones(()) if row_weights is None else row_weights.double()[:, None]
        self.terms = tv_focal(x, t, alpha=-1 if alpha is None else alpha, gamma=gamma, reduction="none") * weights
        self.loss = self.terms.sum()
        (self.grad,) = torch.autograd.grad(self.loss, x)
        self.terms, self.loss = self.terms.detach(), self.loss.detach()
        x = x.detach()
        ce = t * F.softplus(-x) + (1 - t) * F.softplus(x)
        alpha_t = 1.0 if alpha is None else t * alpha + (1 - t) * (1 - alpha)
        self.term_bound = 16 * U32 * alpha_t * (1 + gamma) ** 2 * (1 + x.abs() + ce) * weights.abs()
        self.loss_bound = (self.term_bound.sum() + (x.numel() + 1) * U32 * self.loss.abs()).item()

    def check(self, loss, grad=None, grad_rounding: float = 0.0) -> None:
        """loss (0-dim) and grad (like the logits, rounded to a unit roundoff of grad_rounding
        when returned in a half-precision dtype) against the reference."""
        error = abs(loss.item() - self.loss.item())
        assert error <= self.loss_bound, f"loss {loss.item()} vs {self.loss.item()}: {error:.3g} > {self.loss_bound:.3g}"
        if grad is not None:
            bound = self.term_bound + grad_rounding * (self.grad.abs() + self.term_bound)
            excess = (grad.double() - self.grad).abs() - bound
            assert (excess <= 0).all(), f"gradient off by {excess.max().item():.3g} more than its bound"


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (None, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_focal_loss_matches_torchvision(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, 7, generator=g) * 4).requires_grad_()
    targets = (torch.rand(300, 7, generator=g) > 0.8).float()
    ours = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    FocalReference(logits, targets, alpha, gamma).check(ours, torch.autograd.grad(ours, logits)[0])


def test_class_target_form_equals_one_hot_form():
    g = torch.Generator().manual_seed(1)
    num_classes = 5
    logits = (torch.randn(400, num_classes, generator=g) * 3).requires_grad_()
    classes = torch.randint(0, num_classes + 1, (400,), generator=g)  # K = background
    one_hot = torch.nn.functional.one_hot(classes, num_classes + 1)[:, :num_classes].float()
    ours = sigmoid_focal_loss_with_classes(logits, classes, alpha=0.25, gamma=2.0)
    FocalReference(logits, one_hot, 0.25, 2.0).check(ours, torch.autograd.grad(ours, logits)[0])


def test_focal_loss_fp16_input_is_computed_in_float32():
    logits = torch.tensor([[12.0, -12.0]], dtype=torch.float16)
    loss = sigmoid_focal_loss_with_classes(logits, torch.tensor([0]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_smooth_l1_beta_zero_is_l1_without_nan_gradients():
    pred = torch.tensor([[0.0, 1.0, -2.0, 0.5]], requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    loss = smooth_l1_loss(pred, target, beta=0.0)
    loss.backward()
    assert loss.item() == 3.5  # 0 + 1 + 2 + 0.5: every partial sum is exact in float32
    assert torch.isfinite(pred.grad).all()


def criterion(box_loss="smooth_l1", momentum=0.0, sync_free=False):
    return RetinaNetCriterion(num_classes=3, matcher=Matcher(sync_free=sync_free), box_coder=BoxCoder(),
                              box_loss=box_loss, normalizer_momentum=momentum, sync_free=sync_free)


ANCHORS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0], [0.0, 10.0, 10.0, 20.0],
                        [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 20.0, 20.0]])


@pytest.mark.parametrize("box_loss", ["smooth_l1", "l1", "giou"])
def test_image_without_boxes_in_batch(box_loss):
    cls_logits = torch.randn(2, 5, 3, requires_grad=True)
    box_deltas = torch.randn(2, 5, 4, requires_grad=True)
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.zeros(0, 4)]
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    losses = criterion(box_loss)(cls_logits, box_deltas, ANCHORS, boxes, labels)
    assert torch.isfinite(losses["loss_cls"]) and losses["num_fg"].item() == 1
    (losses["loss_cls"] + losses["loss_box"]).backward()
    # the empty image contributes classification gradients and no box gradient
    assert cls_logits.grad[1].abs().sum() > 0
    assert box_deltas.grad[1].abs().sum() == 0


def test_batch_of_only_empty_images_keeps_graph():
    cls_logits = torch.randn(2, 5, 3, requires_grad=True)
    box_deltas = torch.randn(2, 5, 4, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    losses = criterion()(cls_logits, box_deltas, ANCHORS, empty, [torch.zeros(0, dtype=torch.long)] * 2)
    assert losses["loss_box"].item() == 0 and losses["loss_box"].requires_grad
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    (losses["loss_cls"] + losses["loss_box"]).backward()
    assert box_deltas.grad is not None and torch.equal(box_deltas.grad, torch.zeros_like(box_deltas))


def test_batched_loss_equals_sum_of_per_image_losses():
    g = torch.Generator().manual_seed(2)
    cls_logits, box_deltas = torch.randn(3, 5, 3, generator=g), torch.randn(3, 5, 4, generator=g) * 0.1
    boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [9.0, 9.0, 21.0, 21.0]]), torch.zeros(0, 4),
             torch.tensor([[10.0, 0.0, 20.0, 11.0]])]
    labels = [torch.tensor([0, 1]), torch.zeros(0, dtype=torch.long), torch.tensor([2])]
    crit = criterion()
    batched = crit(cls_logits, box_deltas, ANCHORS, boxes, labels)
    num_fg = batched["num_fg"].item()
    total_cls, total_box = 0.0, 0.0
    for i in range(3):
        single = crit(cls_logits[i:i + 1], box_deltas[i:i + 1], ANCHORS, boxes[i:i + 1], labels[i:i + 1])
        total_cls += single["loss_cls"] * max(single["num_fg"].item(), 1)
        total_box += single["loss_box"] * max(single["num_fg"].item(), 1)
    # The same nonnegative terms summed in other groupings: each sum rounds at most once per term
    # (n of them), within u of the total; the terms are the same formulas on the same values, a
    # transcendental or two per factor that torch's scalar and vector paths may round an ulp
    # apart, and the normalisers divide and multiply: 16 u more, on either side.
    rtol = 2 * (cls_logits.numel() + box_deltas.numel() + 16) * U32
    assert torch.allclose(batched["loss_cls"] * num_fg, total_cls, rtol=rtol, atol=0)
    assert torch.allclose(batched["loss_box"] * num_fg, total_box, rtol=rtol, atol=0)


def test_normalizer_ema():
    crit = criterion(momentum=0.9)
    boxes, labels = [torch.tensor([[0.0, 0.0, 10.0, 10.0]])], [torch.tensor([0])]
    crit(torch.zeros(1, 5, 3), torch.zeros(1, 5, 4), ANCHORS, boxes, labels)
    # one positive: ema = 0.9 * 100 + 0.1 * 1, three float32 roundings: within 3 u, pytest.approx's 1e-6 is 17 u
    assert crit.normalizer_ema.item() == pytest.approx(90.1)


def sigmoid_focal_loss_per_anchor(logits: torch.Tensor, classes: torch.Tensor, *, alpha: Optional[float] = 0.25,
                                  gamma: float = 2.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """(N, K) logits, (N,) classes in 0..K (K = background) -> (N,) focal loss summed over classes.

    Every entry is scored as a negative (target eps/2); the N_pos entries (row, class) of positives
    are then corrected by (positive term - negative term), target 1 - eps/2. No one-hot tensor.
    The autograd reference of sigmoid_focal_loss_with_classes, for per-anchor values.
    """
    num_classes = logits.shape[-1]
    t_neg, t_pos = label_smoothing / 2, 1 - label_smoothing / 2
    per_anchor = binary_focal_terms(logits, t_neg, alpha, gamma).sum(dim=-1)
    rows = torch.nonzero(classes < num_classes, as_tuple=True)[0]
    pos_logits = logits[rows, classes[rows]]
    correction = binary_focal_terms(pos_logits, t_pos, alpha, gamma) - \
        binary_focal_terms(pos_logits, t_neg, alpha, gamma)
    return per_anchor.index_add(0, rows, correction)


def test_fused_focal_loss_across_chunks_weights_smoothing_and_autocast(monkeypatch):
    from retinanet.losses import focal
    monkeypatch.setattr(focal, "_CHUNK_ELEMENTS", 64)  # many chunks, a ragged last one
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(333, 6, generator=g) * 3).requires_grad_()
    classes = torch.randint(0, 7, (333,), generator=g)
    weights = torch.rand(333, generator=g) * (torch.rand(333, generator=g) > 0.2)  # zeros = ignored
    for smoothing in (0.0, 0.1):
        # the fused loss and the autograd per-anchor form (negatives, then positives corrected),
        # both in float32, each against the definition on smoothed one-hot targets in float64
        targets = F.one_hot(classes, 7)[:, :6].float() * (1 - smoothing) + smoothing / 2
        reference = FocalReference(logits, targets, row_weights=weights)
        ours = sigmoid_focal_loss_with_classes(logits, classes, label_smoothing=smoothing, row_weights=weights)
        reference.check(ours, torch.autograd.grad(ours, logits)[0])
        per_anchor = (sigmoid_focal_loss_per_anchor(logits, classes, label_smoothing=smoothing) * weights).sum()
        reference.check(per_anchor, torch.autograd.grad(per_anchor, logits)[0])
    # under autocast (bfloat16 on CPU) the math stays float32: the float32 loss of the rounded
    # logits (the definition in float64, to float32 rounding), and the gradient comes back in the
    # logits' dtype
    low = logits.detach().bfloat16().requires_grad_()
    targets = (torch.rand(333, 6, generator=g) > 0.7).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = sigmoid_focal_loss(low, targets)
    FocalReference(low, targets).check(ours)
    (g_low,) = torch.autograd.grad(ours, low)
    assert g_low.dtype == torch.bfloat16 and torch.isfinite(g_low.float()).all()


def test_fused_focal_loss_mean_and_none_reductions():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 50, 4, generator=g).requires_grad_()
    targets = (torch.rand(2, 50, 4, generator=g) > 0.9).float()
    reference = FocalReference(logits, targets)
    # "none": each term within its bound; "mean": the sum's bound over numel (one more rounding)
    terms = sigmoid_focal_loss(logits, targets, reduction="none")
    assert ((terms.double() - reference.terms).abs() <= reference.term_bound).all()
    mean = sigmoid_focal_loss(logits, targets, reduction="mean")
    assert abs(mean.item() - reference.loss.item() / logits.numel()) <= \
        reference.loss_bound / logits.numel() + U32 * abs(mean.item())
    with pytest.raises(ValueError, match="reduction"):
        sigmoid_focal_loss(logits, targets, reduction="max")


def test_compiled_kernel_equals_torchvision_and_eager():
    """kernel="compile" (torch.compile of the same math, one exp for sigmoid and softplus) against
    torchvision's loss and gradient in float64: class targets with row weights, soft float
    targets without alpha, bfloat16 logits (compiled and eager, gradients rounded to bfloat16)."""
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(500, 9, generator=g) * 4).requires_grad_()
    classes = torch.randint(0, 10, (500,), generator=g)
    weights = torch.rand(500, generator=g) * (torch.rand(500, generator=g) > 0.2)
    one_hot = torch.nn.functional.one_hot(classes, 10)[:, :9].float()
    ours = sigmoid_focal_loss_with_classes(logits, classes, row_weights=weights, kernel="compile")
    FocalReference(logits, one_hot, row_weights=weights).check(ours, torch.autograd.grad(ours, logits)[0])

    soft = torch.rand(500, 9, generator=g)
    ours = sigmoid_focal_loss(logits, soft, alpha=None, gamma=1.5, kernel="compile")
    FocalReference(logits, soft, None, 1.5).check(ours, torch.autograd.grad(ours, logits)[0])

    low = logits.detach().bfloat16().requires_grad_()
    reference = FocalReference(low, one_hot)
    for kernel in ("compile", "eager"):
        loss = sigmoid_focal_loss_with_classes(low, classes, kernel=kernel)
        (g_low,) = torch.autograd.grad(loss, low)
        assert g_low.dtype == torch.bfloat16
        reference.check(loss, g_low, grad_rounding=torch.finfo(torch.bfloat16).eps / 2)


def test_one_exp_sigmoid_and_softplus_match_float64():
    """The compiled kernel's sigmoid / softplus (one exp, log1p as a series) in float32, to 16 u
    of float64's: e = exp(-|x|) within an ulp, sigmoid four roundings from it; softplus: s =
    e / (2 + e) six, the series 2 + (2/3) s^2 + ... (s^2 <= 1/9, so its roundings and
    truncation, < 2e-8, move it by about 2 u), the product and the add two: about 10 u."""
    from retinanet.losses.focal import _sigmoid_and_softplus
    z = torch.linspace(-80, 80, 400001)
    prob, softplus = _sigmoid_and_softplus(z, one_exp=True)
    torch.testing.assert_close(prob.double(), torch.sigmoid(z.double()), rtol=1e-6, atol=0)
    torch.testing.assert_close(softplus.double(), torch.nn.functional.softplus(z.double()), rtol=1e-6, atol=0)


def test_compiled_kernel_at_extreme_logits_equals_float64_reference():
    """The compiled loop takes sigmoid and softplus from one exp(-|x|): exact at saturated logits
    too, where the positive's gradient is the whole story. Relative precision element by
    element: at these logits each factor of the gradient is a few roundings from e with no
    cancellation that matters, so 20 u against rtol 1e-5 (168 u); atol for the elements that lose
    relative precision: values below float32's normal range (1.2e-38) and terms where 1 - p
    rounds to 0 (below 1e-20 with gamma 2)."""
    x = torch.tensor([-100.0, -30.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 30.0, 100.0])
    logits = x[:, None].repeat(1, 3).requires_grad_()
    classes = torch.tensor([0, 1, 2, 3, 3, 0, 1, 2, 0])  # 3: background
    ours = sigmoid_focal_loss_with_classes(logits, classes, kernel="compile")
    ref_logits = logits.detach().double().requires_grad_()
    one_hot = torch.nn.functional.one_hot(classes, 4)[:, :3].double()
    ref = tv_focal(ref_logits, one_hot, reduction="sum")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=0)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(ref, ref_logits)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-5, atol=1e-12)


def test_auto_kernel_compiles_big_cpu_inputs_and_a_failed_compile_falls_back_to_eager(monkeypatch):
    from torch._inductor.exc import InvalidCxxCompiler

    from retinanet.compiling import CompiledOrNone
    from retinanet.losses import focal
    rows = -(-focal._COMPILE_MIN_ELEMENTS // 80)  # the smallest (rows, 80) at the threshold
    assert focal._auto_kernel(torch.empty(rows, 80)) == "compile"
    assert focal._auto_kernel(torch.empty(rows - 1, 80)) == "eager"  # compiling would not pay
    assert focal._auto_kernel(torch.empty(rows, 80, dtype=torch.float64)) == "eager"

    def broken(*args):
        raise InvalidCxxCompiler()  # what inductor raises, at the first call, without a C++ compiler
    compiled = CompiledOrNone(focal._one_exp_loss_and_grad, "loss.cls.kernel")
    compiled.compiled = broken
    monkeypatch.setattr(focal, "_compiled", compiled)
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(300, 6, generator=g).requires_grad_()
    classes = torch.randint(0, 7, (300,), generator=g)
    with pytest.warns(UserWarning, match="eager"):
        ours = sigmoid_focal_loss_with_classes(logits, classes, kernel="compile")
    assert compiled.never  # warned once, then eager for the rest of the process
    eager = sigmoid_focal_loss_with_classes(logits, classes, kernel="eager")
    torch.testing.assert_close(ours, eager, rtol=0, atol=0)


def test_fused_gradient_is_handed_over_without_a_copy_and_survives_retain_graph(monkeypatch):
    from retinanet.losses import focal
    buffers = []

    def spy(*args):
        total, grad = real_eager(*args)
        buffers.append(grad.data_ptr())  # not the tensor: a reference here would force a copy
        return total, grad
    real_eager = focal._eager
    monkeypatch.setattr(focal, "_eager", spy)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(200, 5, generator=g).requires_grad_()
    classes = torch.randint(0, 6, (200,), generator=g)
    loss = sigmoid_focal_loss_with_classes(logits, classes, kernel="eager")
    loss.backward(retain_graph=True)
    # the forward's gradient buffer became logits.grad: no (N, K) copy on the way
    assert logits.grad.data_ptr() == buffers[0]
    first = logits.grad.clone()
    (loss * 3).backward()  # a second backward recomputes from the saved inputs
    # the same kernel on the same inputs gives `first` again; first + 3 first rounds twice
    torch.testing.assert_close(logits.grad, first * 4, rtol=2 * U32, atol=0)
    assert len(buffers) == 2


def test_kernel_choice_is_checked():
    logits, classes = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="kernel"):
        sigmoid_focal_loss_with_classes(logits, classes, kernel="fast")
    from retinanet.losses.focal_triton import triton_focal_available
    if not triton_focal_available(logits.device):
        with pytest.raises(ConfigError, match="triton.*set loss.cls.kernel"):  # the user's choice
            sigmoid_focal_loss_with_classes(logits, classes, kernel="triton")


@pytest.mark.parametrize("box_loss", ["smooth_l1", "l1", "giou"])
def test_sync_free_matching_and_box_loss_equal_the_sparse_ones(box_loss):
    """The GPU forms (no nonzero / unique, so no host sync), run on CPU against the CPU forms:
    same matches, same losses, same gradients; images without boxes and padding included."""
    g = torch.Generator().manual_seed(8)
    xy = torch.rand(600, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + 4 + torch.rand(600, 2, generator=g) * 30], dim=1)
    boxes = [torch.cat([b, b[:, :2] + 6 + torch.rand(len(b), 2, generator=g) * 30], dim=1)
             for b in (torch.rand(7, 2, generator=g) * 90, torch.zeros(0, 2), torch.rand(3, 2, generator=g) * 90)]
    labels = [torch.randint(0, 3, (len(b),), generator=g) for b in boxes]
    cls_logits = torch.randn(3, 600, 3, generator=g)
    box_deltas = torch.randn(3, 600, 4, generator=g) * 0.2
    results = []
    for dense in (False, True):
        crit = RetinaNetCriterion(num_classes=3, matcher=Matcher(max_iou_elements=2000, sync_free=dense),
                                  box_coder=BoxCoder(), box_loss=box_loss, sync_free=dense)
        cls, deltas = cls_logits.clone().requires_grad_(), box_deltas.clone().requires_grad_()
        losses = crit(cls, deltas, anchors, boxes, labels)
        (losses["loss_cls"] + losses["loss_box"]).backward()
        padded = pad_targets(boxes, labels)
        results.append((crit.matcher(anchors, padded[0], padded[2]), losses, cls.grad, deltas.grad))
    (m0, l0, c0, d0), (m1, l1, c1, d1) = results
    assert torch.equal(m0, m1) and l0["num_fg"] > 10
    # the same matches: the classification loss is the same computation, bit for bit
    assert torch.equal(l1["loss_cls"], l0["loss_cls"]) and torch.equal(c1, c0)
    # The box terms: the same formulas on the same values; where torch's scalar and vector paths
    # round a log (encode) or exp (decode) an ulp apart, a term moves by an ulp of the values it
    # comes from (deltas, offsets, boxes: a few times the terms' scale here), 16 u of the total at
    # most. Summed over 4 per positive (dense: plus exact zeros) in other orders, each sum rounds
    # at most once per nonzero term, within u of the (nonnegative) total.
    terms = 4 * int(l0["num_fg"])
    torch.testing.assert_close(l1["loss_box"], l0["loss_box"], rtol=2 * (terms + 16) * U32, atol=0)
    # each gradient element: a few operations (encode or decode, difference, clip, / normaliser)
    # on the same values, an ulp apart at most at each: 16 u of the gradient's scale
    torch.testing.assert_close(d1, d0, rtol=0, atol=16 * U32 * d0.abs().max().item())
    assert d1[1].abs().sum() == 0  # the image without boxes: no box gradient


def test_sync_free_batch_of_only_empty_images_keeps_graph():
    box_deltas = torch.randn(2, 5, 4, requires_grad=True)
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    losses = criterion(sync_free=True)(torch.randn(2, 5, 3), box_deltas, ANCHORS, empty, [torch.zeros(0, dtype=torch.long)] * 2)
    assert losses["loss_box"].item() == 0 and losses["loss_box"].requires_grad
    losses["loss_box"].backward()
    assert torch.equal(box_deltas.grad, torch.zeros_like(box_deltas))
