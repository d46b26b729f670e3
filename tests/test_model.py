import math

import pytest
import torch
from torchvision.models import resnet18
from torchvision.ops import FrozenBatchNorm2d

from retinanet.config import ModelConfig
from retinanet.model import FPN, ResNetBackbone, RetinaHead, build_model


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
    assert torch.allclose(head.cls_score.bias, torch.full((27,), -math.log(99)))
    assert abs(head.cls_subnet[0].weight.std().item() - 0.01) < 0.002
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
    backbone.load_torchvision_weights(path)
    assert torch.equal(backbone.stem[0].weight, reference.conv1.weight)
    assert torch.equal(backbone.stem[1].running_mean, reference.bn1.running_mean)
    assert torch.equal(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    expected = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
        reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))))))
    assert torch.allclose(backbone(x)[2], expected, atol=1e-5)


def test_load_wrong_weights_is_clear(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"r18\.pth.*ResNet-50"):
        ResNetBackbone(depth=50).load_torchvision_weights(path)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ResNetBackbone(depth=18).load_torchvision_weights(tmp_path / "missing.pth")


@pytest.mark.parametrize("depth, norm, expected", [(18, "frozen_bn", 20), (50, "bn", 53)])
def test_fold_batchnorm_keeps_outputs_and_removes_every_norm(depth, norm, expected):
    from retinanet.model.fold import fold_batchnorm
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=4)
    cfg.backbone.depth, cfg.backbone.norm = depth, norm
    model = build_model(cfg, 4, load_backbone_weights=False).eval()
    for module in model.modules():  # non-trivial statistics and affine terms
        if isinstance(module, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.rand(2, 3, 128, 160)
    with torch.no_grad():
        before = model(images)
        assert fold_batchnorm(model) == expected
        after = model(images)
    assert not any(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in model.modules())
    for a, b in zip(before.cls_logits, after.cls_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(before.box_deltas, after.box_deltas, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_leaves_training_batchnorm_alone():
    from retinanet.model.fold import fold_batchnorm
    cfg = ModelConfig(num_classes=4)
    cfg.backbone.depth, cfg.backbone.norm, cfg.backbone.freeze_at = 18, "bn", 0
    model = build_model(cfg, 4, load_backbone_weights=False).train()
    assert fold_batchnorm(model) == 0  # batch statistics are not a fixed affine map


def test_fused_frozen_batchnorm_trains_like_the_two_step_form():
    """Training with FrozenBN applied inside the conv: same outputs, same gradients, same
    state-dict keys as conv then FrozenBN."""
    from retinanet.model.fold import fuse_frozen_batchnorm
    torch.manual_seed(0)
    cfg = small_cfg(freeze_at=0)
    cfg.fold_batchnorm = False
    plain = build_model(cfg, num_classes=4)
    for module in plain.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.2, 0.2)
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    cfg.fold_batchnorm = True
    fused = build_model(cfg, num_classes=4)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 96, 128)
    outs = []
    for model in (plain, fused):
        out = model.train()(images)
        (out.cls_logits.square().mean() + out.box_deltas.square().mean()).backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = outs
    torch.testing.assert_close(b.cls_logits, a.cls_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.box_deltas, a.box_deltas, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a["backbone.stem.0.weight"] is not None
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5)
    assert sum(type(m).__name__ == "_ConvFrozenBN" for m in fused.modules()) == 20  # R18: all of them
    assert fuse_frozen_batchnorm(fused) == 0  # already fused: nothing left to do
