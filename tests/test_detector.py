import numpy as np
import pytest
import torch

from retinanet import Detector
from retinanet.data import CocoDetection

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


def test_predict_rejects_bad_input(detector):
    with pytest.raises(ValueError, match="image 0: arrays must be RGB uint8"):
        detector.predict([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="image 1: tensors must be float"):
        detector.predict([np.zeros((10, 10, 3), np.uint8), torch.zeros(3, 10, 10, dtype=torch.uint8)])
    assert detector.predict([]) == []


def test_class_names_from_dataset(detector, shapes_dir):
    ds = CocoDetection(shapes_dir / "val", shapes_dir / "annotations" / "instances_val.json")
    assert detector.class_names == ds.class_names == ["circle", "square", "triangle", "star", "cross"]
