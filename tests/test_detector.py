import warnings

import numpy as np
import pytest
import torch

from retinanet import Detector
from retinanet.data import CocoDetection
from retinanet.model.winograd import WinogradConv2d

from conftest import REPO_ROOT, tiny_overrides


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
    # at the test size (no resize, so no uint8 rounding in between) both input kinds agree
    square = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
    (from_array,) = detector.predict([square])
    (from_tensor,) = detector.predict([torch.from_numpy(square).permute(2, 0, 1).float() / 255])
    assert torch.allclose(from_tensor["scores"], from_array["scores"], atol=1e-5)
    assert torch.allclose(from_tensor["boxes"], from_array["boxes"], atol=1e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_preprocessing_runs_on_the_model_device(shapes_dir, tmp_path, monkeypatch, device):
    """Arrays and tensors (from any device) reach the test-time transform as float tensors on the
    detector's device: on a GPU, normalising and padding there and not on the host (0.30x ->
    1.31x torchvision's inference speed on an H100). The detections equal the CPU detector's."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    overrides = tiny_overrides(shapes_dir, tmp_path) + ["model.postprocess.score_thresh=0.0",
                                                         "model.postprocess.max_detections=20"]
    torch.manual_seed(0)
    reference = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides,
                                     device="cpu")
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
    for got, want in zip(outputs, reference.predict([array, tensor])):
        assert got["boxes"].device.type == "cpu"  # predict's outputs are on the CPU, as documented
        torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-3)


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
    convolutions by Winograd (on CPU). On CUDA in full float32: TF32 convolutions would round
    the two differently (1e-3), which is not what is checked."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    overrides = tiny_overrides(shapes_dir, tmp_path) + ["model.postprocess.score_thresh=0.0",
                                                         "model.postprocess.max_detections=20"]
    torch.manual_seed(0)
    eager = Detector.from_config(REPO_ROOT / "configs" / "shapes_R18.yaml", overrides=overrides)
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
            ours = compiled.predict(images)
        assert not [w for w in caught if "torch.compile failed" in str(w.message)]  # no fallback
        for got, want in zip(ours, eager.predict(images)):
            torch.testing.assert_close(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["boxes"], want["boxes"], rtol=1e-4, atol=1e-3)
            assert torch.equal(got["labels"], want["labels"])
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
