import copy
import math

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from retinanet.config import ModelConfig
from retinanet.model import FPN, ResNetBackbone, RetinaHead, build_model
from retinanet.weights import load_imagenet_weights

from numerics import U64, assert_within, network_rtol, network_shape


def small_cfg(**backbone):
    cfg = ModelConfig()
    cfg.backbone.depth = 18
    for key, value in backbone.items():
        setattr(cfg.backbone, key, value)
    cfg.fpn.channels = 32
    cfg.head.num_convs = 2
    return cfg


def test_output_shapes_match_anchors():
    model = build_model(small_cfg(), num_classes=4).eval()
    out = model(torch.randn(2, 3, 128, 256))
    expected = sum((128 // s) * (256 // s) for s in (8, 16, 32, 64, 128)) * 9
    assert out.cls_logits.shape == (2, expected, 4)
    assert out.box_deltas.shape == (2, expected, 4)
    assert out.anchors.shape == (expected, 4)
    assert sum(out.num_anchors_per_level) == expected


def test_head_init_prior_probability():
    head = RetinaHead(channels=16, num_anchors=9, num_classes=3, num_convs=2, norm="gn",
                      gn_groups=8, prior_prob=0.01)
    # -log(99) rounded to float32 against the bias computed as -log(0.99 / 0.01): an ulp at most
    assert torch.allclose(head.cls_score.bias, torch.full((27,), -math.log(99)))
    # std of 16 * 16 * 9 draws of N(0, 0.01): standard error 0.01 / sqrt(2 * 2304) = 1.5e-4: 0.002 is 13 of them
    assert abs(head.cls_subnet[0].weight.std().item() - 0.01) < 0.002
    # logits = -log(99) + N(0, ~0.1) (weights 0.01 over 144 inputs of scale < 1): mean score 0.01 +- 1e-4
    cls_logits, _ = head([torch.randn(1, 16, 8, 8)])
    assert abs(cls_logits.sigmoid().mean().item() - 0.01) < 0.005


def test_fpn_levels_and_p6_source():
    feats = [torch.randn(1, 8, 32, 32), torch.randn(1, 16, 16, 16), torch.randn(1, 24, 8, 8)]
    for p6_from, in_ch in (("c5", 24), ("p5", 12)):
        fpn = FPN(in_channels=[8, 16, 24], channels=12, p6_from=p6_from)
        assert fpn.p6.in_channels == in_ch
        outs = fpn(feats)
        assert [o.shape[-1] for o in outs] == [32, 16, 8, 4, 2] and all(o.shape[1] == 12 for o in outs)


def test_frozen_bn_and_freeze_at():
    backbone = ResNetBackbone(depth=18, norm="frozen_bn", freeze_at=2)
    assert isinstance(backbone.stem[1], FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    # FrozenBN has no trainable parameters at all: its affine terms are buffers
    assert not any("bn" in n for n, _ in backbone.named_parameters())


def test_trainable_bn_in_frozen_stage_keeps_statistics():
    backbone = ResNetBackbone(depth=18, norm="bn", freeze_at=1).train()
    before = backbone.stem[1].running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert torch.equal(backbone.stem[1].running_mean, before)
    assert not backbone.layer1[0].bn1.running_mean.eq(0).all()  # trainable stage does update


def test_load_torchvision_imagenet_weights(tmp_path):
    reference = resnet18(weights=None)
    torch.nn.init.normal_(reference.bn1.running_mean)  # non-trivial BN statistics
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone = ResNetBackbone(depth=18, norm="frozen_bn", freeze_at=0)
    load_imagenet_weights(backbone, path, depth=18)
    assert torch.equal(backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(backbone.stem[1].running_mean, reference.bn1.running_mean)
    assert torch.equal(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    reference.eval().double()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
            reference.maxpool(reference.relu(reference.bn1(reference.conv1(x.double()))))))))
        # ours in float32 (FrozenBatchNorm2d) against torchvision's in float64 (BatchNorm2d): rounding only
        assert_within(backbone(x)[2], expected, network_rtol(*network_shape(backbone)), "C5")


def test_load_wrong_weights_is_clear(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"r18\.pth.*ResNet-50"):
        load_imagenet_weights(ResNetBackbone(depth=50), path, depth=50)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_imagenet_weights(ResNetBackbone(depth=18), tmp_path / "missing.pth", depth=18)


def _shake_norms(model: torch.nn.Module) -> None:
    """Non-trivial statistics and affine terms in every BatchNorm."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("depth, norm, expected", [(18, "frozen_bn", 20), (50, "bn", 53)])
def test_fold_batchnorm_keeps_outputs_and_removes_every_norm(depth, norm, expected):
    """Folding is exact algebra: in float64 the folded model equals the two-step one to float64
    rounding. In float32 the two round differently; each stays within float32 rounding of the
    two-step model evaluated in float64."""
    from retinanet.model.fold import fold_batchnorm
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=4)
    cfg.backbone.depth, cfg.backbone.norm = depth, norm
    cfg.fpn.channels, cfg.head.num_convs, cfg.head.gn_groups = 32, 1, 8  # the norms are all in the backbone
    model = build_model(cfg, 4, load_backbone_weights=False).eval()
    _shake_norms(model)
    model64 = copy.deepcopy(model).double()
    depth_and_fan_in = network_shape(model)
    images = torch.rand(2, 3, 128, 160)
    with torch.no_grad():
        want = model64(images.double())
        before = model(images)
        for norms in (model, model64):  # fold_batchnorm returns a new model: count what it folds
            assert sum(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d))
                       for m in norms.modules()) == expected
        model, model64 = fold_batchnorm(model), fold_batchnorm(model64)
        after, after64 = model(images), model64(images.double())
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in model.modules())
    for name in ("cls_logits", "box_deltas"):
        assert_within(getattr(after64, name), getattr(want, name), network_rtol(*depth_and_fan_in, U64),
                      f"folded float64 {name}")
        for label, out in (("two-step", before), ("folded", after)):
            assert_within(getattr(out, name), getattr(want, name), network_rtol(*depth_and_fan_in),
                          f"{label} float32 {name}")


def test_fold_batchnorm_leaves_training_batchnorm_alone():
    from retinanet.model.fold import fold_batchnorm
    cfg = ModelConfig(num_classes=4)
    cfg.backbone.depth, cfg.backbone.norm, cfg.backbone.freeze_at = 18, "bn", 0
    model = build_model(cfg, 4, load_backbone_weights=False).train()
    folded = fold_batchnorm(model)  # batch statistics are not a fixed affine map: nothing folded
    assert not any(isinstance(m, torch.nn.Identity) for m in folded.modules())


def test_fused_frozen_batchnorm_trains_like_the_two_step_form():
    """Training with FrozenBN applied inside the conv: same outputs, same gradients, same
    state-dict keys as conv then FrozenBN.

    Outputs in float32: each form within float32 rounding of the two-step form in float64.
    Gradients in float64 only: in float32 the two forms round ~1e-7 apart, and a ReLU input that
    close to zero flips its mask and moves that element's gradient by its full size (PITFALLS.md);
    in float64 a flip would need an input within ~1e-16 of zero, so the gradients agree to
    float64 rounding, which a wrong fold (even the eps term, ~1e-5 here) far exceeds."""
    from retinanet.model.fold import fuse_frozen_batchnorm
    torch.manual_seed(0)
    cfg = small_cfg(freeze_at=0)
    cfg.fold_batchnorm = False
    plain = build_model(cfg, num_classes=4)
    _shake_norms(plain)
    cfg.fold_batchnorm = True
    fused = build_model(cfg, num_classes=4)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    assert sum(type(m).__name__ == "_ConvFrozenBN" for m in fused.modules()) == 20  # R18: all of them
    images = torch.rand(2, 3, 64, 96)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        for label, model in (("plain", plain), ("fused", fused)):
            model = copy.deepcopy(model).to(dtype).train()
            out = model(images.to(dtype))
            (out.cls_logits.square().mean() + out.box_deltas.square().mean()).backward()
            runs[label, dtype] = (out, {n: p.grad for n, p in model.named_parameters()})
    depth, fan_in = network_shape(plain)
    want, grads_want = runs["plain", torch.float64]
    for label in ("plain", "fused"):
        out = runs[label, torch.float32][0]
        assert_within(out.cls_logits, want.cls_logits, network_rtol(depth, fan_in), f"{label} cls_logits")
        assert_within(out.box_deltas, want.box_deltas, network_rtol(depth, fan_in), f"{label} box_deltas")
    grads = runs["fused", torch.float64][1]
    assert grads.keys() == grads_want.keys() and grads["backbone.stem.0.weight"] is not None
    # backward: the layers again, and weight gradients sum over batch x positions (2 x 32 x 48 at the stem)
    grad_rtol = network_rtol(2 * depth, max(fan_in, 2 * 32 * 48), U64)
    for name in grads:
        assert_within(grads[name], grads_want[name], grad_rtol, name)
    refused = fuse_frozen_batchnorm(fused)  # already fused: nothing left to do
    assert [type(m) for m in refused.modules()] == [type(m) for m in fused.modules()]
