"""What two computations of the same thing may differ by, for the tests that compare them.

- The same sequence of operations on the same machine rounds the same way: compare bit for bit
  (torch.equal), no helper needed.
- A float32 network against its float64 evaluation (same weights, same input): forward values
  are continuous, so they differ by float32 rounding only. `network_rtol` states a bound, relative
  to the output's largest magnitude. Gradients are not continuous (ReLU masks and max-pool choices
  flip where an input sits within rounding of a kink): compare them in float64, where rounding is
  ~1e-16 and such a flip needs an input within that of a kink.
- Detection lists: thresholds, top-k and NMS are decisions that flip where a score or IoU sits
  within rounding of the threshold or of another score, so two lists are compared by matching
  (`assert_detections_agree`), allowing only such near-tie detections to be missing.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

U32 = 2.0 ** -24  # unit roundoff of float32
U64 = 2.0 ** -53  # of float64
# Standard deviations allowed under the random-rounding model below: a Gaussian tail at 10 sigma
# is below 1e-22, so no machine, summation order or kernel choice plausibly reaches it.
LAMBDA = 10.0


def network_shape(model: nn.Module) -> tuple[int, int]:
    """(depth, fan_in) for `network_rtol`: the number of convolution and normalisation layers
    (at least the layers any activation passes through in series) and the largest number of
    products a convolution sums (in_channels / groups * kernel area)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    fan_in = max(m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] for m in convs)
    return len(convs) + len(norms), fan_in


def network_rtol(depth: int, fan_in: int, unit: float = U32) -> float:
    """Bound on |y - y_exact| / max|y_exact| for a network of `depth` layers, each a sum of at
    most `fan_in` products, evaluated with unit roundoff `unit`.

    Rounding errors of a K-term sum behave like independent zero-mean variables (Higham & Mary,
    "A new approach to probabilistic rounding error analysis", 2019): the sum is off by about
    sqrt(K) * u of its scale, and by more than LAMBDA * sqrt(K) * u with negligible probability.
    Each layer adds that much relative to its output's scale, and the layers add up (ReLU and
    max-pool are 1-Lipschitz; BatchNorm / GroupNorm / He init keep every layer's activations at
    the output's scale). Typical float32 errors measured here are 100x below this bound; a real
    mistake (a missing ReLU, a wrong layout, wrong weights) moves outputs by O(1) of their scale.
    """
    return depth * LAMBDA * math.sqrt(fan_in) * unit


def assert_within(actual: Tensor, reference: Tensor, rtol: float, what: str = "") -> None:
    """|actual - reference| <= rtol * max|reference| elementwise (reference in float64)."""
    reference = reference.detach().double().cpu()
    error = (actual.detach().double().cpu() - reference).abs().max().item()
    bound = rtol * reference.abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3g} > bound {bound:.3g} ({error / bound:.3g}x)"


# ------------------------------------------------------------------------------ detections

def box_tolerance(reference, delta_error: float, box_coder, rescale: float = 1.0) -> float:
    """How far a decoded corner can move when the box deltas of `reference` (a RetinaNetOutput)
    move by at most delta_error and boxes are then multiplied by at most `rescale`.

    x0 = dx / wx * w_a + cx_a - exp(dw / ww) * w_a / 2 moves by at most
    w_a * delta_error / min(weights) * (1 + exp(max dw / ww + delta_error) / 2), w_a at most the
    largest anchor side; either side's decoding rounds a corner by a few u of its magnitude.
    Clipping does not increase a difference."""
    deltas, anchors = reference.box_deltas.detach().double(), reference.anchors.detach().double()
    min_weight = min(box_coder.weights)
    max_dw = min(deltas[..., 2:].max().item() / min_weight, box_coder.clamp)
    max_side = (anchors[:, 2:] - anchors[:, :2]).max().item()
    corner = max_side * delta_error / min_weight * (1 + math.exp(max_dw + delta_error) / 2)
    corner += 2 * 8 * U32 * (anchors.abs().max().item() + max_side * math.exp(max_dw))
    return corner * rescale


# Two float32 sigmoids of one logit: torch's vectorised kernel (SLEEF exp) and its scalar one (libm
# exp, for the last elements of a tensor) each round exp, an add and a division, to within 4 u of p.
SCORE_RTOL = 8 * U32
# Two float32 decodings of one box: a few roundings (exp, products, sums) of a corner each side,
# each within u of the magnitudes involved (coordinates and sides): 16 u of the largest coordinate.
BOX_ULPS = 16 * U32


def rounding_box_tol(*detections: dict) -> float:
    """box_tol for boxes decoded from the same deltas and anchors by the same formulas: BOX_ULPS of
    the largest coordinate."""
    return BOX_ULPS * max([d["boxes"].abs().max().item() for d in detections if len(d["boxes"])], default=0.0)


def _score_tol(scores: Tensor, logit_tol: float) -> Tensor:
    """How far a sigmoid score p can move when its logit moves by logit_tol: at most
    logit_tol * max sigmoid' over [x - logit_tol, x + logit_tol] <= logit_tol * e^logit_tol * p (1 - p),
    plus the two sides' rounding of p (SCORE_RTOL)."""
    scores = scores.double()
    return logit_tol * math.exp(logit_tol) * scores * (1 - scores) + SCORE_RTOL * scores


def _unmatched(a: dict, b: dict, logit_tol: float, box_tol: float) -> Tensor:
    """(len(a),) bool: a's detections with no detection of b of the same label, score within
    what logit_tol allows and every corner within box_tol."""
    if len(a["scores"]) == 0 or len(b["scores"]) == 0:
        return torch.full((len(a["scores"]),), len(b["scores"]) == 0)
    tol = torch.maximum(_score_tol(a["scores"], logit_tol)[:, None], _score_tol(b["scores"], logit_tol)[None])
    close = ((a["labels"][:, None] == b["labels"][None])
             & ((a["scores"][:, None].double() - b["scores"][None].double()).abs() <= tol)
             & ((a["boxes"][:, None] - b["boxes"][None]).abs().amax(-1) <= box_tol))
    return ~close.any(1)


def _near_a_decision(d: int, a: dict, b: dict, *, logit_tol: float, score_thresh: float,
                     nms_thresh: float, iou_tol: float, max_detections: int) -> bool:
    """Whether rounding can explain that detection d of list a is missing from list b."""
    score = a["scores"][d:d + 1]
    tol = _score_tol(score, logit_tol).item()
    if score.item() <= score_thresh + tol:  # the score threshold
        return True
    if len(b["scores"]) >= max_detections and score.item() <= b["scores"].min().item() + tol:
        return True  # b is full: d falls at (or, after a flip above it, below) b's cut
    # NMS in b suppressed d: a detection of d's label that ranks above it (to rounding) and
    # overlaps it above the threshold (to iou_tol). As d survived NMS in a, that overlap is near
    # the threshold, or the two scores tie (which of them survives is a tie), or that detection
    # is itself missing from a (a flip above d)
    above = (b["labels"] == a["labels"][d]) & (b["scores"].double() >= score.item() - tol
                                                - _score_tol(b["scores"], logit_tol))
    if above.any():
        iou = box_iou(a["boxes"][d:d + 1].double(), b["boxes"][above].double())[0]
        return bool((iou >= nms_thresh - iou_tol).any())
    return False


def assert_detections_agree(got: dict, want: dict, *, logit_tol: float, box_tol: float,
                            score_thresh: float, nms_thresh: float, max_detections: int,
                            iou_tol: float = 0.01, max_unmatched: int = 3, what: str = "") -> None:
    """got / want: one image's {"boxes", "scores", "labels"} (sigmoid scores) from two
    computations whose logits differ by at most logit_tol and boxes by at most box_tol (for
    bit-identical logits and deltas: 0 and rounding_box_tol, as sigmoid and decoding may run in
    differently shaped tensors, where torch's kernels take scalar or vector paths). Every detection of either list has a partner in the
    other (same label, within the tolerances) except at most max_unmatched per list, each near a
    decision that rounding can flip (see _near_a_decision): a systematic difference leaves far
    more unmatched, or unmatched ones far from any decision.

    iou_tol: how far an IoU can move, by box_tol and by batched_nms's rounding (its per-class
    coordinate offsets reach 1e5 px, where float32 steps are 0.008 px): 0.01 for boxes >= 8 px."""
    for a, b, side in ((got, want, "got"), (want, got, "want")):
        missing = _unmatched(a, b, logit_tol, box_tol).nonzero().flatten().tolist()
        assert len(missing) <= max_unmatched, \
            f"{what}: {len(missing)} of {len(a['scores'])} detections ({side}) have no partner"
        for d in missing:
            assert _near_a_decision(d, a, b, logit_tol=logit_tol, score_thresh=score_thresh,
                                    nms_thresh=nms_thresh, iou_tol=iou_tol, max_detections=max_detections), \
                (f"{what}: detection {d} ({side}: label {a['labels'][d].item()}, score "
                 f"{a['scores'][d].item():.6g}, box {a['boxes'][d].tolist()}) has no partner and "
                 "is near no threshold, cut or NMS overlap")
