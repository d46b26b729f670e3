"""Converted torchvision RetinaNets (v1 and v2) give torchvision's detections, head outputs and
anchors; the converter rejects what does not fit.

torchvision's models are built with random weights (weights=None, weights_backbone=None), then made
non-trivial: random BatchNorm affine terms and data-derived statistics, random biases, and a
classifier scaled so that scores spread over (0, 1) instead of sitting at the prior. Inputs are
smaller than the configs' 800/1333 to keep the test fast (the resize itself is compared at
800/1333 in test_eval_transform_matches_torchvision_at_800_1333).
"""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from retinanet import Detector
from retinanet.data import Collate, EvalTransform
from retinanet.config import load_config
from retinanet.errors import CheckpointError as ConversionError
from retinanet.model import build_model
from retinanet.weights import check_against, convert_torchvision_state, unwrap_state_dict

from conftest import REPO_ROOT
from numerics import assert_detections_agree, rounding_box_tol

CONFIGS = {"v1": REPO_ROOT / "configs/torchvision/retinanet_resnet50_fpn.yaml",
           "v2": REPO_ROOT / "configs/torchvision/retinanet_resnet50_fpn_v2.yaml"}
BUILDERS = {"v1": retinanet_resnet50_fpn, "v2": retinanet_resnet50_fpn_v2}
MIN_SIZE, MAX_SIZE = 256, 384
# (h, w): no resize, upscaled and non-square, bounded by the max size, odd sizes everywhere
IMAGE_SIZES = [(256, 256), (131, 277), (410, 190)]
SCORE_THRESH = 0.001  # lowered on both sides: hundreds of boxes per image are compared


def _freeze_batchnorm(module: torch.nn.Module) -> None:
    """BatchNorm2d -> FrozenBatchNorm2d, as torchvision builds v1 whenever it loads weights."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)


def _torchvision_model(arch: str, images: list[torch.Tensor]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[arch](weights=None, weights_backbone=None, score_thresh=SCORE_THRESH,
                           min_size=MIN_SIZE, max_size=MAX_SIZE)
    batchnorms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in batchnorms:  # random affine terms, then statistics measured on data
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
            bn.momentum = None
            bn.reset_running_stats()
        model.train()
        model.backbone.body(model.transform([torch.rand(3, 200, 260) for _ in range(2)])[0].tensors)
        for bn in batchnorms:
            bn.running_var.add_(0.05)  # eps 0 below: keep dead channels finite
            if arch == "v1":
                bn.eps = 0.0  # what torchvision's overwrite_eps does for the COCO v1 weights
        if arch == "v1":
            _freeze_batchnorm(model.backbone.body)
        for module in [*model.backbone.fpn.modules(), *model.head.modules()]:
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0, 0.1)
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
        for module in model.head.modules():
            if isinstance(module, torch.nn.Conv2d):  # He init: features neither vanish nor explode
                module.weight.normal_(0, math.sqrt(2 / (module.in_channels * 9)))
        model.eval()
        head = model.head.classification_head
        head.cls_logits.bias.normal_(-3, 0.5)
        features = list(model.backbone(model.transform(images)[0].tensors).values())
        head.cls_logits.weight.div_(head(features).std())  # logits ~ N(-3, 1): scores spread out
    return model


def _images() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(3, h, w, generator=generator) for h, w in IMAGE_SIZES]


def _capture(module: torch.nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    return module.register_forward_hook(lambda _m, _inp, out: store.append(out))


@pytest.fixture(scope="module", params=["v1", "v2"])
def parity(request, tmp_path_factory):
    """Runs both models once on the same images; the tests below compare what they returned."""
    arch = request.param
    tmp = tmp_path_factory.mktemp(f"tv_{arch}")
    images = _images()
    tv_model = _torchvision_model(arch, images)
    src, dst = tmp / "torchvision.pth", tmp / "converted.pth"
    torch.save({"model": tv_model.state_dict()}, src)  # a training checkpoint's layout
    run = subprocess.run([sys.executable, str(REPO_ROOT / "tools/convert_torchvision.py"),
                          "--src", str(src), "--dst", str(dst), "--arch", arch],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "91 classes" in run.stdout

    tv_head, tv_anchors, ours_raw = [], [], []
    hooks = [_capture(tv_model.head, tv_head), _capture(tv_model.anchor_generator, tv_anchors)]
    with torch.no_grad():
        tv_detections = tv_model(images)
    detector = Detector.from_config(CONFIGS[arch], weights=dst, device="cpu", overrides=[
        f"model.postprocess.score_thresh={SCORE_THRESH}", f"data.test_min_size={MIN_SIZE}",
        f"data.test_max_size={MAX_SIZE}"])
    hooks.append(_capture(detector.model, ours_raw))
    ours = detector.predict(images)
    for hook in hooks:
        hook.remove()
    return {"arch": arch, "tv": tv_detections, "ours": ours, "tv_head": tv_head[0],
            "tv_anchors": tv_anchors[0], "ours_raw": ours_raw[0], "tv_model": tv_model,
            "detector": detector, "images": images}


def test_detections_match_torchvision(parity):
    """The raw outputs are torchvision's bit for bit (below) and scores and boxes come from them by
    the same elementwise formulas (sigmoid, decode, clip), in differently shaped tensors (torch's
    kernels may then take their scalar or vector path: an ulp or so apart). Which candidates are
    kept is a decision (top-k per level, NMS per image there and over the batch here, the cut at
    max_detections) that only a tie can turn (e.g. two logits that sigmoid rounds to one score),
    and a tie can also swap two rows: detections are matched, not compared row by row."""
    postprocessor = parity["detector"].postprocessor
    for i, (ref, ours) in enumerate(zip(parity["tv"], parity["ours"])):
        assert len(ref["boxes"]) > 100, "too few boxes compared to prove anything"
        assert_detections_agree(ours, ref, logit_tol=0.0, box_tol=rounding_box_tol(ours, ref), score_thresh=SCORE_THRESH,
                                nms_thresh=postprocessor.nms_thresh,
                                max_detections=postprocessor.max_detections, what=f"image {i}")
        # COCO labels of torchvision models are category ids (label_map: category_id)
        assert torch.equal(ours["category_ids"], ours["labels"])


def test_raw_head_outputs_and_anchors_match_torchvision(parity):
    """Bit for bit: the converted configs run torchvision's sequence of operations (contiguous
    layout, BatchNorm as its own op, the same convolutions, upsampling, additions and reshapes on
    the same input), and the same operations on the same machine round the same way."""
    raw = parity["ours_raw"]
    tv_head = parity["tv_head"]
    assert torch.equal(raw.cls_logits, tv_head["cls_logits"])
    assert torch.equal(raw.box_deltas, tv_head["bbox_regression"])
    # the levels' split points are the same
    tv_levels = [h * w * 9 for h, w in (f.shape[-2:] for f in parity["tv_model"].backbone(
        parity["tv_model"].transform(parity["images"])[0].tensors).values())]
    assert raw.num_anchors_per_level == tv_levels
    for tv_anchors in parity["tv_anchors"]:  # one (A, 4) per image, all equal
        torch.testing.assert_close(raw.anchors, tv_anchors, atol=0, rtol=0)


def test_preprocessing_matches_torchvision(parity):
    detector, images = parity["detector"], parity["images"]
    batch = detector.collate([detector.transform({"image": img, "image_id": i,
                                                  "orig_size": tuple(img.shape[-2:])})
                              for i, img in enumerate(images)])
    image_list, _ = parity["tv_model"].transform(images)
    assert batch.image_sizes == [tuple(s) for s in image_list.image_sizes]
    torch.testing.assert_close(batch.images, image_list.tensors, atol=0, rtol=0)


def test_eval_transform_matches_torchvision_at_800_1333():
    """The configs' own sizes: the resize (incl. the max-size bound and upscaling) is torchvision's."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ours = EvalTransform(min_size=800, max_size=1333, mean=mean, std=std)
    reference = GeneralizedRCNNTransform(800, 1333, mean, std).eval()
    generator = torch.Generator().manual_seed(2)
    images = [torch.rand(3, h, w, generator=generator) for h, w in [(480, 640), (427, 1000), (999, 333)]]
    samples = [ours({"image": img, "image_id": i, "orig_size": tuple(img.shape[-2:])})
               for i, img in enumerate(images)]
    batch = Collate(32)(samples)
    image_list, _ = reference(images)
    assert batch.image_sizes == [tuple(s) for s in image_list.image_sizes]
    torch.testing.assert_close(batch.images, image_list.tensors, atol=0, rtol=0)
    # uint8 HWC input (decoded files) is the same image as its float tensor / 255
    uint8 = (images[0] * 255).round().byte()
    from_numpy = ours({"image": uint8.permute(1, 2, 0).numpy(), "image_id": 0, "orig_size": (480, 640)})
    from_tensor = ours({"image": uint8.float() / 255, "image_id": 0, "orig_size": (480, 640)})
    torch.testing.assert_close(from_numpy["image"], from_tensor["image"], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Converter errors
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v1_state():
    return BUILDERS["v1"](weights=None, weights_backbone=None).state_dict()


@pytest.fixture(scope="module")
def ours_v1_state():
    config = load_config(CONFIGS["v1"])
    return build_model(config.model, 91, load_backbone_weights=False).state_dict()


def _convert_cli(tmp_path, obj, arch):
    src = tmp_path / "src.pth"
    torch.save(obj, src)
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools/convert_torchvision.py"), "--src",
                           str(src), "--dst", str(tmp_path / "dst.pth"), "--arch", arch],
                          capture_output=True, text=True, timeout=300)


def test_converter_reads_torchvisions_old_key_layout(v1_state, ours_v1_state):
    """torchvision's published v1 checkpoint predates Conv2dNormActivation: head convs are
    conv.{0,2,4,6}, FPN blocks have no ".0"."""
    old = {}
    for key, value in v1_state.items():
        for head in ("classification_head", "regression_head"):
            for i in range(4):
                key = key.replace(f"head.{head}.conv.{i}.0.", f"head.{head}.conv.{2 * i}.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(3):
                key = key.replace(f"fpn.{block}.{i}.0.", f"fpn.{block}.{i}.")
        old[key] = value
    assert old.keys() != v1_state.keys()
    new_converted = convert_torchvision_state(v1_state, "v1")
    old_converted = convert_torchvision_state(old, "v1")
    check_against(new_converted, ours_v1_state, "v1")
    assert old_converted.keys() == new_converted.keys()
    assert all(torch.equal(old_converted[k], new_converted[k]) for k in new_converted)


def test_converter_rejects_missing_unexpected_and_reshaped_keys(v1_state, ours_v1_state):
    def check(state):
        check_against(convert_torchvision_state(state, "v1"), ours_v1_state, "v1")

    missing = {k: v for k, v in v1_state.items() if not k.startswith("backbone.fpn.extra_blocks.p7")}
    with pytest.raises(ConversionError, match=re.escape("missing ['fpn.p7.bias', 'fpn.p7.weight']")):
        check(missing)
    with pytest.raises(ConversionError, match=r"not part of a torchvision RetinaNet v1.*backbone\.body\.fc"):
        check(dict(v1_state, **{"backbone.body.fc.weight": torch.zeros(3)}))
    reshaped = dict(v1_state, **{"backbone.fpn.extra_blocks.p6.weight": torch.zeros(256, 256, 1, 1)})
    with pytest.raises(ConversionError, match=r"shape mismatch.*fpn\.p6\.weight"):
        check(reshaped)
    with pytest.raises(ConversionError, match="arch must be one of"):
        convert_torchvision_state(v1_state, "v3")
    with pytest.raises(ConversionError, match="not a state dict"):
        unwrap_state_dict([torch.zeros(3)])


def test_converter_cli_errors_are_one_line(tmp_path, v1_state):
    wrong_arch = _convert_cli(tmp_path, v1_state, "v2")
    assert wrong_arch.returncode == 2
    assert "src.pth" in wrong_arch.stderr and "try --arch v1" in wrong_arch.stderr
    assert "Traceback" not in wrong_arch.stderr and len(wrong_arch.stderr.strip().splitlines()) == 1
    unreadable = _convert_cli(tmp_path, np.zeros(3), "v1")  # not loadable with weights_only
    assert unreadable.returncode == 2 and "cannot be read as a torch checkpoint" in unreadable.stderr
    assert not (tmp_path / "dst.pth").exists()  # nothing written on any failure
