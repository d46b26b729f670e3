"""INT8 export (retinanet/quantize.py): only the network's convolutions are quantized, the
calibration images are the split's or a folder's, and the INT8 file finds float32's detections."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from retinanet.config import load_config
from retinanet.data import build_transform
from retinanet.errors import ConfigError
from retinanet.export import export_onnx, onnx_session, run_onnx
from retinanet.quantize import (calibration_batches, calibration_files, compare_with_float,
                                detection_overlap, float_convolutions, network_nodes,
                                quantize_onnx)
from retinanet.detector import Detector
from retinanet.inference import read_rgb
from retinanet.predictor import Predictor, build_postprocessor

from conftest import REPO_ROOT, tiny_overrides
from test_export import one_thread, tiny_model  # noqa: F401  (one_thread: an autouse fixture)

onnx = pytest.importorskip("onnx", reason="INT8 export needs onnx: pip install -e .[export]")
pytest.importorskip("onnxruntime", reason="INT8 export needs onnxruntime: pip install -e .[export]")

# Of float32's detections with score >= 0.3 on the validation images, the INT8 file must find at
# least this share (same label, IoU >= 0.5): the requirement a quantized detector is held to here,
# not a figure read off a run (8-bit activations move a box by ~1/256 of its feature's range, far
# less than IoU 0.5 allows; what can go is a detection whose score sits near the threshold).
MIN_FOUND = 0.9


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shapes_dir):
    """A tiny detector (a head shaken so that it detects), its float32 ONNX file, and the INT8
    file calibrated on 8 training images."""
    tmp = tmp_path_factory.mktemp("int8")
    config = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                         tiny_overrides(shapes_dir, tmp / "run") + ["model.postprocess.score_thresh=0.02"])
    model = tiny_model(config)
    detector = Detector(model, transform=build_transform(config.data, train=False),
                        postprocessor=build_postprocessor(config),
                        size_divisibility=config.data.size_divisibility, config=config)
    fp32, int8 = tmp / "model.onnx", tmp / "model_int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(Predictor(model, postprocessor=detector.postprocessor).eval(), torch.zeros(2, 3, 128, 128), fp32)
    files = calibration_files("train", config, limit=8)
    info = quantize_onnx(fp32, int8, calibration_batches(detector, files))
    return detector, config, fp32, int8, info


def test_only_the_networks_convolutions_are_quantized(exported):
    _, _, fp32, int8, info = exported
    graph = onnx.load(str(int8)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert info["quantized_convs"] == len(convs) and info["float_convs"] == 0
    producer = {output: node.op_type for node in graph.node for output in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    dequantize = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert quantize and dequantize
    # activations are quantized where the network makes them (the input, convolutions, their
    # ReLUs, residual adds, max-pool) and nowhere in the postprocessing, which sees float32 only
    assert {producer.get(n.input[0], n.input[0]) for n in quantize} <= {"images", "Conv", "Relu", "Add", "MaxPool"}
    assert all(consumers[n.output[0]] == {"DequantizeLinear"} for n in quantize)
    fed = set().union(*(consumers[n.output[0]] for n in dequantize))
    assert "Conv" in fed and not fed & {"TopK", "NonMaxSuppression", "Sigmoid", "Exp", "Gather", "GatherND"}
    # the network part holds every Conv and none of the postprocessing
    model = onnx.load(str(fp32))
    network = network_nodes(model)
    kinds = {n.op_type for n in model.graph.node if n.name in network}
    assert "Conv" in kinds and not kinds & {"TopK", "NonMaxSuppression", "Sigmoid", "Exp"}


def test_int8_finds_float32s_detections(exported, shapes_dir):
    detector, _, fp32, int8, _ = exported
    files = calibration_files(shapes_dir / "val", None)
    total, found = compare_with_float(detector, fp32, int8, files)
    assert total >= 10, "the tiny model must detect something for the check to mean anything"
    assert found >= MIN_FOUND * total, (found, total)


def test_int8_runs_at_another_batch_and_size(exported, shapes_dir):
    """The INT8 graph keeps the float32 graph's dynamic batch, height and width."""
    detector, _, _, int8, _ = exported
    images = [read_rgb(p) for p in calibration_files(shapes_dir / "val", None)[:3]]
    batch = detector.preprocess(images).images
    boxes, scores, labels, counts = run_onnx(onnx_session(int8), torch.nn.functional.pad(batch, (0, 128)))
    assert boxes.shape == (3, detector.postprocessor.max_detections, 4) and counts.shape == (3,)


def test_detection_overlap_counts_same_label_matches():
    ref = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 5, 5]]),
            "scores": torch.tensor([0.9, 0.5, 0.1]), "labels": torch.tensor([1, 2, 1])}]
    other = [{"boxes": torch.tensor([[1.0, 0, 10, 10], [20, 20, 40, 40]]),
              "scores": torch.tensor([0.2, 0.6]), "labels": torch.tensor([1, 3])}]
    # the first found (score 0.2 >= 0.3 / 2, IoU 0.9), the second has another label, the third is
    # under the threshold and not counted
    assert detection_overlap(ref, other) == (2, 1)
    other[0]["scores"][0] = 0.1  # under half the threshold: lost
    assert detection_overlap(ref, other) == (2, 0)


def test_calibration_files_from_a_split_or_a_folder(tiny_config, shapes_dir):
    train = calibration_files("train", tiny_config)
    assert len(train) == 24 and all(p.parent == shapes_dir / "train" for p in train)
    spread = calibration_files("train", tiny_config, limit=6)
    assert spread == train[::4]
    folder = calibration_files(shapes_dir / "val", tiny_config, limit=100)
    assert len(folder) == 8
    with pytest.raises(ConfigError, match="positive number"):
        calibration_files("val", tiny_config, limit=0)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        calibration_files(shapes_dir / "no_such_folder", tiny_config)


def test_keep_float_names_the_stem_and_the_heads_last_convolutions(exported):
    _, config, fp32, _, _ = exported
    model = onnx.load(str(fp32))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert float_convolutions(model, ["stem"]) == {convs[0]}
    outputs = float_convolutions(model, ["outputs"])
    assert len(outputs) == 2 * len(config.model.anchors.sizes)  # classification and box, per level
    with pytest.raises(ConfigError, match="choose from stem, outputs"):
        float_convolutions(model, ["head"])
    with pytest.raises(ConfigError, match="choose from minmax"):
        quantize_onnx(fp32, fp32.parent / "x.onnx", [], method="kl")


def run_export(args, shapes_dir, tmp_path, weights):
    overrides = tiny_overrides(shapes_dir, tmp_path / "run") + ["model.postprocess.score_thresh=0.02"]
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "export.py"), "--config",
                           str(REPO_ROOT / "configs" / "shapes_R18.yaml"), "--weights", str(weights),
                           *args, *overrides], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_tool_writes_int8(shapes_dir, tmp_path, tiny_config):
    weights = tmp_path / "weights.pth"
    torch.save(tiny_model(tiny_config).state_dict(), weights)
    output = tmp_path / "model_int8.onnx"
    result = run_export(["--format", "onnx", "--int8", "--calibration", str(shapes_dir / "val"),
                         "--calibration-images", "4", "--keep-float", "stem", "--output", str(output)],
                        shapes_dir, tmp_path, weights)
    assert result.returncode == 0, result.stderr
    assert output.is_file() and "1 kept in float32" in result.stdout
    assert "minmax ranges from 4 images" in result.stdout and "float32 detections with score" in result.stdout
    bad = run_export(["--format", "torchscript", "--int8", "--calibration", "train", "--output",
                      str(tmp_path / "m.pt")], shapes_dir, tmp_path, weights)
    assert bad.returncode == 2 and "--int8 quantizes the ONNX graph" in bad.stderr
