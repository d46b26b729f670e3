import copy
import re
import warnings

import numpy as np
import pytest
import torch

from retinanet import Detector
from retinanet.config import config_to_yaml, load_config
from retinanet.data import CocoDetection
from retinanet.errors import ConfigError
from retinanet.model import build_model
from retinanet.model.winograd import WinogradConv2d

from conftest import REPO_ROOT, tiny_overrides
from numerics import assert_detections_agree, assert_within, box_tolerance, network_rtol, network_shape


@pytest.fixture(scope="module")
def detector(shapes_dir, tmp_path_factory):
    overrides = tiny_overrides(shapes_dir, tmp_path_factory.mktemp("run")) + [
        "model.postprocess.score_thresh=0.0", "model.postprocess.max_detections=20"]
    torch.manual_seed(0)
    return Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides)


def test_predict_numpy_and_tensor_inputs(detector):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 160, 3), dtype=np.uint8),
              rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)]
    outputs = detector.predict(images)
    assert len(outputs) == 2
    for image, out in zip(images, outputs):
        assert out["boxes"].shape == (20, 4) and out["scores"].shape == (20,)
        assert (out["boxes"][:, 2] <= image.shape[1] + 1e-3).all()
        assert (out["boxes"][:, 3] <= image.shape[0] + 1e-3).all()
        assert out["labels"].max() < 5
        assert torch.equal(out["category_ids"], out["labels"] + 1)  # shapes ids are 1..5
    # an array becomes from_numpy(array).permute(2, 0, 1).float() / 255 (rgb_to_tensor), the very
    # tensor given here, so the rest is the same computation: bit for bit
    square = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    (from_array,) = detector.predict([square])
    (from_tensor,) = detector.predict([torch.from_numpy(square).permute(2, 0, 1).float() / 255])
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(from_tensor[key], from_array[key]), key


def _hw(image) -> tuple[int, int]:
    return tuple(image.shape[-2:]) if isinstance(image, torch.Tensor) else tuple(image.shape[:2])


def _predict_with_outputs(detector: Detector, images: list) -> tuple[list[dict], object, object]:
    """predict's steps (transform, collate, run_batch), keeping the raw outputs -> (detections
    on the detector's device, raw outputs, batch)."""
    samples = [detector.transform({"image": image, "image_id": i, "orig_size": _hw(image)})
               for i, image in enumerate(images)]
    batch = detector.collate(samples)
    raw, detections = detector.run_batch(batch)
    return detections, raw, batch


def _spread_scores(model: torch.nn.Module) -> None:
    """A randomly initialised head scores every anchor at its prior (0.01). Its classification
    branch shaken, scores spread over (0, 1), so that the ranking, the cut at max_detections and
    NMS decide something (the box branch keeps its small deltas: boxes stay near their anchors)."""
    g = torch.Generator().manual_seed(0)
    head = model.head
    with torch.no_grad():
        for param in [*head.cls_subnet.parameters(), *head.cls_score.parameters()]:
            param.add_(torch.randn(param.shape, generator=g).to(param) * 0.05)
        head.cls_score.bias.copy_(torch.randn(head.cls_score.bias.shape, generator=g) - 3.0)


def _assert_same_detections(got: list[dict], want: list[dict], detector: Detector, reference, batch) -> None:
    """Detections of two float32 computations of `detector`'s network, each within network_rtol
    of its exact outputs (reference: one of their raw outputs): matched up to the score and box
    differences that allows, near-ties excepted (numerics.assert_detections_agree)."""
    rtol = network_rtol(*network_shape(detector.model))
    # |a - b| <= |a - exact| + |exact - b| <= 2 rtol max|exact|, max|exact| <= max|a| / (1 - rtol)
    logit_error, delta_error = (2 * rtol / (1 - rtol) * t.abs().max().item()
                                for t in (reference.cls_logits, reference.box_deltas))
    rescale = max(max(o / s for o, s in zip(orig, size)) for orig, size in zip(batch.orig_sizes, batch.image_sizes))
    postprocessor = detector.postprocessor
    box_tol = box_tolerance(reference, delta_error, postprocessor.box_coder, rescale)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_detections_agree({k: v.cpu() for k, v in a.items()}, {k: v.cpu() for k, v in b.items()},
                                logit_tol=logit_error, box_tol=box_tol,
                                score_thresh=postprocessor.score_thresh, nms_thresh=postprocessor.nms_thresh,
                                max_detections=postprocessor.max_detections, what=f"image {i}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_preprocessing_runs_on_the_model_device(shapes_dir, tmp_path, monkeypatch, device):
    """Arrays and tensors (from any device) reach the test-time transform as float tensors on the
    detector's device: on a GPU, normalising and padding there and not on the host (0.30x ->
    1.31x torchvision's inference speed on an H100). The detections equal the CPU detector's: bit
    for bit on the CPU (the same computation), on a GPU up to float32 rounding (matched)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    overrides = tiny_overrides(shapes_dir, tmp_path) + ["model.postprocess.score_thresh=0.0",
                                                         "model.postprocess.max_detections=20"]
    torch.manual_seed(0)
    reference = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides,
                                     device="cpu")
    _spread_scores(reference.model)
    detector = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides,
                                    device=device)
    detector.model.load_state_dict(reference.model.state_dict())
    seen = []
    transform = detector.transform
    monkeypatch.setattr(detector, "transform", lambda sample: seen.append(sample["image"]) or transform(sample))
    rng = np.random.default_rng(2)
    array = rng.integers(0, 255, (128, 96, 3), dtype=np.uint8)
    tensor = torch.from_numpy(rng.integers(0, 255, (3, 128, 128), dtype=np.uint8)).float() / 255
    outputs = detector.predict([array, tensor])
    assert [(type(x), x.device.type, x.dtype) for x in seen] == [(torch.Tensor, device, torch.float32)] * 2
    expected = reference.predict([array, tensor])
    assert all(got["boxes"].device.type == "cpu" for got in outputs)  # predict's outputs are on the CPU
    if device == "cpu":
        for got, want in zip(outputs, expected):
            for key in ("boxes", "scores", "labels", "category_ids"):
                assert torch.equal(got[key], want[key]), key
    else:  # other kernels round differently
        _, raw, batch = _predict_with_outputs(reference, [array, tensor])
        _assert_same_detections(outputs, expected, reference, raw, batch)


def test_predict_rejects_bad_input(detector):
    with pytest.raises(ValueError, match="image 0: arrays must be RGB uint8"):
        detector.predict([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="image 1: tensors must be float"):
        detector.predict([np.zeros((10, 10, 3), np.uint8), torch.zeros(3, 10, 10, dtype=torch.uint8)])
    assert detector.predict([]) == []


def test_class_names_from_dataset(detector, shapes_dir):
    ds = CocoDetection(shapes_dir / "val", shapes_dir / "annotations" / "instances_val.json")
    assert detector.class_names == ds.class_names == ["circle", "square", "triangle", "star", "cross"]


@pytest.mark.parametrize("winograd", [False, True])
def test_compiled_inference_equals_eager_across_input_sizes(shapes_dir, tmp_path, monkeypatch, winograd):
    """model.compile_inference: torch.compile with frozen weights; the same detections as the
    eager model, also after a second input size (a recompilation); with model.winograd the 3x3
    convolutions by Winograd (on CPU). Compiled kernels (fused, Winograd) round differently from
    eager ones: both networks' outputs stay within float32 rounding of the network in float64,
    and the detections match up to what that allows. On CUDA in full float32: TF32 convolutions
    round to 1e-3, which is not what is checked."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    overrides = tiny_overrides(shapes_dir, tmp_path) + ["model.postprocess.score_thresh=0.0",
                                                         "model.postprocess.max_detections=20"]
    torch.manual_seed(0)
    eager = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides)
    _spread_scores(eager.model)
    compiled = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                                    overrides=overrides + ["model.compile_inference=true",
                                                           f"model.winograd={str(winograd).lower()}"])
    converted = sum(isinstance(m, WinogradConv2d) for m in compiled.model.modules())
    assert (converted > 0) == (winograd and compiled.device.type == "cpu")
    compiled.model.load_state_dict(eager.model.state_dict())  # before the first (freezing) call
    rng = np.random.default_rng(1)
    # one size with Winograd: its compilation takes minutes on 2 cores, and recompiling for a new
    # size is what the plain case checks
    for shape in ((128, 128, 3),) if winograd else ((128, 128, 3), (128, 256, 3)):
        images = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(2)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours, ours_raw, _ = _predict_with_outputs(compiled, images)
        assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # no fallback
        theirs, theirs_raw, batch = _predict_with_outputs(eager, images)
        with torch.no_grad():
            exact = copy.deepcopy(eager.model).double()(batch.images.double().to(eager.device))
        rtol = network_rtol(*network_shape(eager.model))
        for label, raw in (("compiled", ours_raw), ("eager", theirs_raw)):
            assert_within(raw.cls_logits, exact.cls_logits, rtol, f"{label} cls_logits")
            assert_within(raw.box_deltas, exact.box_deltas, rtol, f"{label} box_deltas")
        _assert_same_detections(ours, theirs, eager, theirs_raw, batch)
    assert not compiled._compiled.failed  # it did not fall back


def test_compiled_inference_falls_back_to_eager_with_a_warning(detector, monkeypatch):
    from torch._inductor.exc import InvalidCxxCompiler

    from retinanet.compiling import CompiledOrNone

    def broken(images):
        raise InvalidCxxCompiler()  # what inductor raises, at the first call, without a C++ compiler
    compiled = CompiledOrNone(detector.model, "model.compile_inference")
    compiled.compiled = broken
    monkeypatch.setattr(detector, "_compiled", compiled)
    images = [np.random.default_rng(2).integers(0, 255, (128, 128, 3), dtype=np.uint8)]
    with pytest.warns(UserWarning, match="model.compile_inference"):
        (out,) = detector.predict(images)
    assert compiled.failed
    monkeypatch.setattr(detector, "_compiled", None)
    (eager,) = detector.predict(images)
    torch.testing.assert_close(out["scores"], eager["scores"], rtol=0, atol=0)
    torch.testing.assert_close(out["boxes"], eager["boxes"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Class names and category ids: the checkpoint's, else the config's dataset in any format
# ---------------------------------------------------------------------------------------------
def _save_checkpoint(path, config, names, category_ids):
    """A trainer checkpoint's layout: weights of a len(names)-class model, config, names, ids."""
    model = build_model(config.model, len(names), load_backbone_weights=False)
    torch.save({"model": model.state_dict(), "config": config_to_yaml(config), "class_names": names,
                "category_ids": category_ids}, path)
    return path


@pytest.fixture
def shapes_config(shapes_dir, tmp_path):
    """The tiny config, its validation json the shapes' (circle, square, triangle, star, cross)."""
    return load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", tiny_overrides(shapes_dir, tmp_path / "run"))


def test_the_checkpoint_names_the_classes_and_a_disagreeing_dataset_is_an_error(shapes_config, tmp_path):
    val_json = shapes_config.data.val.annotations
    # the dataset's names with other ids: the checkpoint's ids are what the model was trained on
    same = _save_checkpoint(tmp_path / "same.pth", shapes_config,
                            ["circle", "square", "triangle", "star", "cross"], [3, 7, 11, 20, 42])
    detector = Detector.from_config(shapes_config, weights=same)
    assert detector.label_to_cat_id == {0: 3, 1: 7, 2: 11, 3: 20, 4: 42}
    other = _save_checkpoint(tmp_path / "other.pth", shapes_config, ["a", "b", "c", "d", "e"], [1, 2, 3, 4, 5])
    with pytest.raises(ConfigError, match=re.escape(f"{other} predicts 5 classes, {val_json} has 5 (label 0: "
                                                    "'a' in the first, 'circle' in the second)")):
        Detector.from_config(shapes_config, weights=other)
    three = _save_checkpoint(tmp_path / "three.pth", shapes_config, ["a", "b", "c"], [1, 2, 3])
    with pytest.raises(ConfigError, match=re.escape(f"{three} predicts 3 classes, {val_json} has 5")):
        Detector.from_config(shapes_config, weights=three)
    # the checkpoint alone does not consult the dataset its config names
    assert Detector.from_checkpoint(other).class_names == ["a", "b", "c", "d", "e"]
    assert Detector.from_checkpoint(three).label_to_cat_id == {0: 1, 1: 2, 2: 3}


def test_a_bare_state_dict_needs_a_config(shapes_config, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save(build_model(shapes_config.model, 5, load_backbone_weights=False).state_dict(), path)
    with pytest.raises(ConfigError, match=re.escape(f"{path} carries no config") + ".*--config"):
        Detector.from_checkpoint(path)
    with pytest.raises(ConfigError, match="RetinaNet_ResNet50_FPN_Weights.COCO_V1 is no checkpoint file; "
                                          "weights by name need the config of their model"):
        Detector.from_checkpoint("RetinaNet_ResNet50_FPN_Weights.COCO_V1")  # nothing downloaded
    detector = Detector.from_config(shapes_config, weights=path)  # the dataset names the classes
    assert detector.class_names == ["circle", "square", "triangle", "star", "cross"]


def _voc(root):
    """Two VOC XML files (no images needed: each has its <size>) with classes dog and cat."""
    (root / "Annotations").mkdir(parents=True)
    for stem, name in (("a", "dog"), ("b", "cat")):
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>64</width><height>48</height>"
            f"</size><object><name>{name}</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax>"
            "<ymax>30</ymax></bndbox></object></annotation>")
    return root / "JPEGImages", root


def _yolo(root):
    """An ultralytics layout whose data.yaml names zebra and ant (in that order)."""
    (root / "labels" / "val").mkdir(parents=True)
    (root / "images" / "val").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [zebra, ant]\n")
    return root / "images" / "val", root / "labels" / "val"


@pytest.mark.parametrize("form, write, names", [("voc", _voc, ["cat", "dog"]),
                                                ("yolo", _yolo, ["zebra", "ant"])])
def test_a_bare_state_dict_takes_the_classes_of_a_dataset_in_any_format(shapes_dir, tmp_path, form, write,
                                                                        names):
    images, annotations = write(tmp_path / form)
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", tiny_overrides(shapes_dir, tmp_path / "run") + [
        f"data.val.images={images}", f"data.val.annotations={annotations}", f"data.val.format={form}",
        "data.train.annotations=none.json"])
    path = tmp_path / "bare.pth"
    torch.save(build_model(config.model, 2, load_backbone_weights=False).state_dict(), path)
    detector = Detector.from_config(config, weights=path)
    assert detector.class_names == names and detector.label_to_cat_id == {0: 1, 1: 2}
