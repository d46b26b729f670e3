"""The classification-loss family (retinanet/losses/classification.py) against closed forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from retinanet.config import ClsLossConfig
from retinanet.losses import (BCELoss, FocalLoss, GHMLoss, OHEMLoss, SoftmaxFocalLoss,
                              build_classification_loss, class_balanced_weights)
from retinanet.losses.classification import anchor_class_weights
from retinanet.losses.focal import binary_focal_terms
from retinanet.predictor import PostProcessor
from retinanet.boxes import BoxCoder


def logit(p):
    return math.log(p / (1 - p))


# Both sides in float64 (the losses keep float64 input in float64): sums of at most 300
# nonnegative terms, each a dozen roundings with no cancellation worse than 100x at these
# logits: (300 + 12 x 100) u64 < 2e-13 of the total.
F64 = dict(rel=1e-12)


def test_worked_example_weights_and_losses():
    targets = torch.tensor([1.0, 0.0, 1.0, 0.0])
    probs = torch.tensor([0.9, 0.1, 0.6, 0.6], dtype=torch.float64)
    logits = torch.logit(probs)
    p_t = torch.tensor([0.9, 0.9, 0.6, 0.4], dtype=torch.float64)
    weights = torch.tensor([0.0025, 0.0075, 0.04, 0.27], dtype=torch.float64)
    losses = binary_focal_terms(logits.double(), targets.double(), alpha=0.25, gamma=2.0)
    # float64 throughout; the worst cancellation (ce = softplus(x) - x at p_t 0.9) is 20x
    assert torch.allclose(losses, weights * -torch.log(p_t), rtol=1e-12, atol=0)
    # the same through the class-target form in float32: 1 class, rows 0 and 2 positive, 1 and 3
    # background. The largest term (p_t 0.4, 92 % of the sum) takes a dozen roundings without
    # cancellation; the cancelling ones weigh < 1 %: 20 u or so, within 1e-5 (168 u)
    per_anchor = FocalLoss(alpha=0.25, gamma=2.0)(logits.float().view(1, 4, 1), torch.tensor([[0, 1, 0, 1]]))
    assert per_anchor.item() == pytest.approx((weights * -torch.log(p_t)).sum().item(), rel=1e-5)


def dense_inputs(seed=0, batch=2, anchors=30, classes=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, anchors, classes, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(-1, classes + 1, (batch, anchors), generator=g)  # -1 ignore, K background
    return logits, labels


def one_hot(labels, classes):
    valid = labels >= 0
    return F.one_hot(labels[valid], classes + 1)[:, :classes].double(), valid


def test_gamma_zero_without_alpha_is_bce():
    logits, labels = dense_inputs()
    targets, valid = one_hot(labels, 4)
    expected = F.binary_cross_entropy_with_logits(logits[valid], targets, reduction="sum")
    for loss in (FocalLoss(alpha=None, gamma=0.0), BCELoss(alpha=None)):
        assert loss(logits, labels).item() == pytest.approx(expected.item(), **F64)


def test_alpha_balanced_bce():
    logits, labels = dense_inputs(1)
    targets, valid = one_hot(labels, 4)
    elementwise = F.binary_cross_entropy_with_logits(logits[valid], targets, reduction="none")
    expected = (elementwise * (0.75 * targets + 0.25 * (1 - targets))).sum()
    assert BCELoss(alpha=0.75)(logits, labels).item() == pytest.approx(expected.item(), **F64)


def test_label_smoothing_moves_targets_towards_half():
    logits, labels = dense_inputs(2)
    targets, valid = one_hot(labels, 4)
    eps = 0.2
    smoothed = targets * (1 - eps) + eps / 2
    expected = binary_focal_terms(logits[valid], smoothed, alpha=0.25, gamma=2.0).sum()
    got = FocalLoss(alpha=0.25, gamma=2.0, label_smoothing=eps)(logits, labels)
    assert got.item() == pytest.approx(expected.item(), **F64)
    # a confident correct positive still costs something once smoothed
    sure = torch.tensor([[[logit(0.999)]]])
    assert FocalLoss(label_smoothing=0.1)(sure, torch.tensor([[0]])) > 10 * FocalLoss()(sure, torch.tensor([[0]]))


def test_ghm_with_one_bin_is_mean_bce():
    logits, labels = dense_inputs(3)
    targets, valid = one_hot(labels, 4)
    expected = F.binary_cross_entropy_with_logits(logits[valid], targets, reduction="mean")
    ghm = GHMLoss(bins=1, momentum=0.0)
    assert not ghm.normalized_by_num_fg
    assert ghm(logits, labels).item() == pytest.approx(expected.item(), **F64)  # one bin: weight 1.0 exactly


def test_ghm_weights_by_inverse_gradient_density():
    # 9 easy negatives (g ~ 0.05) and 1 hard one (g ~ 0.95), two bins: each bin gets equal total weight
    probs = torch.tensor([0.05] * 9 + [0.95])
    logits = torch.logit(probs).view(1, 10, 1)
    labels = torch.ones(1, 10, dtype=torch.long)  # all background (K = 1)
    bce = F.binary_cross_entropy_with_logits(logits.view(-1), torch.zeros(10), reduction="none")
    weights = torch.tensor([10 / 9 / 2] * 9 + [10 / 1 / 2])
    expected = (bce * weights).sum() / 10
    # float32: 10 terms and their weights (10 / 9 / 2 rounded) each side: (10 + 8) u x 2 within 1e-5 (168 u)
    assert GHMLoss(bins=2, momentum=0.0)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ghm_momentum_accumulates_counts():
    ghm = GHMLoss(bins=2, momentum=0.5)
    logits = torch.logit(torch.tensor([0.05] * 9 + [0.95])).view(1, 10, 1)
    labels = torch.ones(1, 10, dtype=torch.long)
    ghm(logits, labels)
    assert ghm.acc_count.tolist() == pytest.approx([4.5, 0.5])
    ghm(logits, labels)
    assert ghm.acc_count.tolist() == pytest.approx([6.75, 0.75])


def test_ohem_keeps_positives_and_hardest_negatives_per_image():
    # image 0: one positive and 5 background anchors of rising difficulty; image 1: no positive
    logits = torch.tensor([[2.0, -5.0, -4.0, -3.0, -2.0, -1.0],
                           [-5.0, -4.0, -3.0, -2.0, -1.0, 0.0]]).view(2, 6, 1)
    labels = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, -1]])
    loss = OHEMLoss(neg_pos_ratio=2.0, min_negatives=1)
    per_anchor = F.softplus(logits.view(2, 6))  # BCE of a background anchor
    expected = F.softplus(-logits[0, 0, 0]) + per_anchor[0, 4] + per_anchor[0, 5] + per_anchor[1, 4]
    # float32: four softplus / BCE terms (a few u each, no cancellation) and their sum: within 1e-6 (17 u)
    assert loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    hard = loss.select_hard_negatives(per_anchor, labels == 0, labels == 1)
    assert hard.tolist() == [[False, False, False, False, True, True],
                             [False, False, False, False, True, False]]  # ignored anchor never picked


def test_softmax_focal_reduces_to_cross_entropy_over_k_plus_one():
    logits, labels = dense_inputs(4)
    valid = labels >= 0
    full = torch.cat([logits[valid], torch.zeros(int(valid.sum()), 1, dtype=logits.dtype)], 1)
    expected = F.cross_entropy(full, labels[valid], reduction="sum")
    got = SoftmaxFocalLoss(alpha=None, gamma=0.0)(logits, labels)
    assert got.item() == pytest.approx(expected.item(), **F64)


def test_softmax_focal_modulation_and_smoothing():
    logits, labels = dense_inputs(5)
    valid = labels >= 0
    full = torch.cat([logits[valid], torch.zeros(int(valid.sum()), 1, dtype=logits.dtype)], 1)
    log_p = full.log_softmax(1)
    p_t = log_p.gather(1, labels[valid][:, None]).exp().squeeze(1)
    alpha_t = torch.where(labels[valid] < 4, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_t) ** 2 * p_t.log()).sum()
    assert SoftmaxFocalLoss()(logits, labels).item() == pytest.approx(expected.item(), **F64)
    eps = 0.1
    target = F.one_hot(labels[valid], 5).double() * (1 - eps) + eps / 5
    expected_smooth = (-target * log_p).sum()
    got = SoftmaxFocalLoss(alpha=None, gamma=0.0, label_smoothing=eps)(logits, labels)
    assert got.item() == pytest.approx(expected_smooth.item(), **F64)


def test_class_balanced_weights_closed_form():
    counts = torch.tensor([10, 100, 1000])
    beta = 0.99
    raw = torch.tensor([(1 - beta) / (1 - beta ** n) for n in (10, 100, 1000)])
    expected = raw * 3 / raw.sum()
    # ours: float64, rounded once to float32; expected: float32 from the start (four roundings,
    # beta ** 1000's the largest at 1000 x |log beta| u = 10 u): within 1e-6 (17 u)
    assert torch.allclose(class_balanced_weights(counts, beta), expected.float(), rtol=1e-6)
    assert torch.allclose(class_balanced_weights(counts, 0.0), torch.ones(3))
    w = anchor_class_weights(torch.tensor([[0, 2, 3, -1]]), expected.float())
    assert w[0].tolist() == pytest.approx([expected[0].item(), expected[2].item(), 1.0, 1.0])


def test_class_balanced_weighting_scales_positive_losses():
    logits, labels = dense_inputs(6)
    anchor_weights = torch.where((labels >= 0) & (labels < 4), 3.0, 1.0).double()
    base = FocalLoss()
    weighted = base(logits, labels, anchor_weights)
    pos = (labels >= 0) & (labels < 4)
    pos_only = base(logits, labels.masked_fill(~pos, -1))
    assert weighted.item() == pytest.approx(base(logits, labels).item() + 2 * pos_only.item(), **F64)


@pytest.mark.parametrize("cfg", [
    ClsLossConfig(type="focal"), ClsLossConfig(type="focal", label_smoothing=0.1),
    ClsLossConfig(type="bce", alpha=0.75), ClsLossConfig(type="ghm", ghm_momentum=0.0),
    ClsLossConfig(type="ohem", ohem_min_negatives=2), ClsLossConfig(type="softmax_focal"),
    ClsLossConfig(type="softmax_focal", label_smoothing=0.1)])
def test_gradcheck_float64(cfg):
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 6, 3, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    labels = torch.tensor([[0, 3, 3, 1, -1, 3], [2, 3, 3, 3, 3, 3]])
    loss = build_classification_loss(cfg)
    # the losses compute in float32 internally except for float64 input: gradcheck needs float64
    assert torch.autograd.gradcheck(lambda x: loss(x, labels), (logits,), eps=1e-6, atol=1e-5)


def test_postprocess_softmax_scores():
    logits = torch.tensor([[[2.0, 0.0]]])  # background logit 0: softmax([2, 0, 0])
    pp = PostProcessor(box_coder=BoxCoder(), score_thresh=0.0, activation="softmax")
    (out,) = pp(logits, torch.zeros(1, 1, 4), torch.tensor([[0.0, 0.0, 10.0, 10.0]]), [1], [(20, 20)])
    expected = torch.tensor([2.0, 0.0, 0.0]).softmax(0)[:2]
    # one softmax of the same three values each side (exp, sum, divide: a few u), allclose's 1e-5 is 168 u
    assert torch.allclose(out["scores"], expected.sort(descending=True).values)


@pytest.mark.parametrize("variant", ["focal", "bce", "ghm", "focal_ls", "ohem", "softmax_focal", "focal_cb"])
def test_every_variant_trains_without_nan(variant, shapes_dir, tmp_path):
    import importlib.util

    from retinanet.config import load_config
    from retinanet.engine.checkpoint import load_checkpoint
    from retinanet.engine.trainer import Trainer

    from conftest import REPO_ROOT, tiny_overrides

    spec = importlib.util.spec_from_file_location("compare_losses", REPO_ROOT / "scripts" / "compare_losses.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    overrides, _ = compare.VARIANTS[variant]
    cfg = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                      tiny_overrides(shapes_dir, tmp_path) + overrides +
                      ["train.max_iter=4", "train.log_period=1", "data.val.annotations="])
    logs = []
    Trainer(cfg, log=logs.append).train()  # raises FloatingPointError on a non-finite loss
    assert sum(line.startswith("iter") for line in logs) == 4
    state = load_checkpoint(tmp_path / "model_final.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
