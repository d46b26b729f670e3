"""Export: the Predictor equals PostProcessor, in-graph anchors equal AnchorGenerator's, and the
TorchScript and ONNX files equal eager PyTorch at other batch sizes and image sizes than traced."""
from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from retinanet.errors import ConfigError
from retinanet.export import (OUTPUT_NAMES, check_onnx_opset, compare_outputs, export_onnx,
                              export_torchscript, mismatch, run_onnx)
from retinanet.model import AnchorGenerator, build_model
from retinanet.predictor import Predictor, build_postprocessor, score_activation

from conftest import REPO_ROOT, tiny_overrides
from numerics import assert_detections_agree, box_tolerance, network_rtol, network_shape

# Traced and scripted at the first shape, run at the others: batch, height and width all change.
EXAMPLE = (2, 3, 128, 128)
OTHER_SHAPES = [(1, 3, 128, 256), (3, 3, 256, 128)]


@pytest.fixture(autouse=True)
def one_thread():
    """Other processes share this machine's 2 cores; two spinning intra-op threads then made
    these tests 10x slower (measured), one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(config):
    """The tiny config's network with a head shaken enough that scores and boxes spread, so that
    the threshold, top-k, NMS and max_detections all have work to do."""
    torch.manual_seed(0)
    model = build_model(config.model, 5, load_backbone_weights=False).eval()
    with torch.no_grad():
        # the classification branch only: scores spread, box deltas stay small (so that boxes
        # near their anchors bound how far rounding can move them, numerics.box_tolerance)
        for param in [*model.head.cls_subnet.parameters(), *model.head.cls_score.parameters()]:
            param.add_(torch.randn_like(param) * 0.05)
        model.head.cls_score.bias.normal_(-3.0, 1.0)
    return model


def inference_model(config, **postprocess):
    for key, value in postprocess.items():
        setattr(config.model.postprocess, key, value)
    postprocessor = build_postprocessor(config)
    model = tiny_model(config)
    return model, postprocessor, Predictor(model, postprocessor=postprocessor).eval()


def images(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_same(expected, actual):
    """The same arithmetic (TorchScript runs torch's kernels on the same tensors): bit for bit."""
    for name, a, b in zip(OUTPUT_NAMES, expected, actual):
        assert torch.equal(a, b), name


def assert_agree(expected, actual, model, postprocessor, raw):
    """onnxruntime's kernels round differently from torch's. Each network's outputs are within
    numerics.network_rtol of exact, so logits and box deltas differ by at most twice that of their
    scale (raw: eager's RetinaNetOutput); detections are matched up to the score and box
    differences that allows, and only one near a threshold, the cut or an NMS overlap may be
    missing (numerics.assert_detections_agree), not compared row by row."""
    rtol = network_rtol(*network_shape(model))
    logit_error, delta_error = (2 * rtol / (1 - rtol) * t.abs().max().item()
                                for t in (raw.cls_logits, raw.box_deltas))
    box_tol = box_tolerance(raw, delta_error, postprocessor.box_coder)
    for i in range(expected[0].shape[0]):
        got, want = ({"boxes": out[0][i, :int(out[3][i])], "scores": out[1][i, :int(out[3][i])],
                      "labels": out[2][i, :int(out[3][i])]} for out in (actual, expected))
        assert_detections_agree(got, want, logit_tol=logit_error, box_tol=box_tol,
                                score_thresh=postprocessor.score_thresh, nms_thresh=postprocessor.nms_thresh,
                                max_detections=postprocessor.max_detections, what=f"image {i}")


@pytest.mark.parametrize("loss, max_detections, shape", [
    ("focal", 100, (3, 3, 256, 128)),        # > 1000 NMS candidates: batched_nms's per-class loop
    ("focal", 2000, (2, 3, 128, 128)),       # fewer than D detections: padding rows
    ("softmax_focal", 50, (2, 3, 128, 256)),
])
def test_eager_equals_postprocessor(tiny_config, loss, max_detections, shape):
    tiny_config.loss.cls.type = loss
    assert score_activation(tiny_config) == ("softmax" if loss == "softmax_focal" else "sigmoid")
    model, postprocessor, exportable = inference_model(tiny_config, score_thresh=0.02,
                                                       max_detections=max_detections)
    x = images(shape)
    with torch.no_grad():
        out = model(x)
        expected = postprocessor(out.cls_logits, out.box_deltas, out.anchors,
                                 out.num_anchors_per_level, [tuple(shape[-2:])] * shape[0])
        boxes, scores, labels, counts = exportable(x)
    assert boxes.shape == (shape[0], max_detections, 4) and labels.dtype == counts.dtype == torch.int64
    for i, detections in enumerate(expected):
        n = len(detections["scores"])
        assert n > 0 and counts[i] == n
        assert torch.equal(boxes[i, :n], detections["boxes"])  # _decode is BoxCoder.decode op for op
        assert torch.equal(scores[i, :n], detections["scores"])
        assert torch.equal(labels[i, :n], detections["labels"])
        assert (boxes[i, n:] == 0).all() and (scores[i, n:] == 0).all() and (labels[i, n:] == -1).all()
    if max_detections == 2000:
        assert (counts < max_detections).all()


def test_eager_without_detections(tiny_config):
    _, _, exportable = inference_model(tiny_config, score_thresh=1.0)  # sigmoid never exceeds 1
    with torch.no_grad():
        boxes, scores, labels, counts = exportable(images(EXAMPLE))
    assert counts.tolist() == [0, 0] and (labels == -1).all() and (boxes == 0).all()


@pytest.mark.parametrize("options", [
    dict(),
    dict(offset=0.5),
    # torchvision's v1 anchors: integer sizes per level, rounded base, strides from the image size
    dict(level_sizes=[[32, 40, 50], [64, 80, 101], [128, 161, 203], [256, 322, 406], [512, 645, 812]],
         round_base=True, stride_from_image=True),
])
def test_shape_anchors_equal_anchor_generator(options):
    generator = AnchorGenerator(sizes=[32, 64, 128, 256, 512], octave_scales=[1, 2 ** (1 / 3), 2 ** (2 / 3)],
                                aspect_ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128], **options)
    in_graph = lambda features, image: generator.from_shapes(features, image)  # noqa: E731

    def inputs(height, width):  # feature maps of a ResNet-FPN: ceil(size / 2) per stride-2 step
        sizes, h, w = [], height, width
        for step in range(7):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            if step >= 2:
                sizes.append((h, w))
        return [torch.zeros(1, 1, h, w) for h, w in sizes], torch.zeros(1, 3, height, width), sizes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated
        traced = torch.jit.trace(in_graph, inputs(256, 384)[:2], check_trace=False)
    # 800 x 1216 (padded to 32): P6 is 13 x 19, so torchvision's strides are 61 and 64, not 64
    for height, width in [(256, 384), (800, 1216), (128, 640)]:
        features, image, sizes = inputs(height, width)
        expected = generator(sizes, torch.device("cpu"), image_size=(height, width))
        assert torch.equal(torch.cat(in_graph(features, image)), expected)
        assert torch.equal(torch.cat(traced(features, image)), expected)  # sizes are not baked in


def test_torchscript_equals_eager_at_other_sizes(tiny_config, tmp_path):
    _, _, exportable = inference_model(tiny_config, score_thresh=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated
        export_torchscript(exportable, images(EXAMPLE), tmp_path / "model.pt")
        loaded = torch.jit.load(str(tmp_path / "model.pt"))
    for shape in [EXAMPLE] + OTHER_SHAPES:
        x = images(shape, seed=2)
        with torch.no_grad():
            expected, actual = exportable(x), loaded(x)
        assert actual[0].shape == (shape[0], 100, 4)
        assert expected[3].sum() > 0
        assert_same(expected, actual)


def test_onnx_equals_eager_at_other_sizes(tiny_config, tmp_path):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package: pip install -e .[export]")
    pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime: "
                                              "pip install -e .[export]")
    import onnx

    model, postprocessor, exportable = inference_model(tiny_config, score_thresh=0.02)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
        export_onnx(exportable, images(EXAMPLE), path)
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    assert "NonMaxSuppression" in op_types(graph.graph)
    assert [o.name for o in graph.graph.output] == list(OUTPUT_NAMES)
    for shape in OTHER_SHAPES:
        x = images(shape, seed=3)
        with torch.no_grad():
            expected, raw = exportable(x), model(x)
        actual = run_onnx(path, x)
        assert actual[0].shape == (shape[0], 100, 4)
        assert expected[3].sum() > 0
        assert_agree(expected, actual, model, postprocessor, raw)


def test_onnx_opset_range():
    check_onnx_opset(16)
    check_onnx_opset(17)
    for opset in (13, 30):
        with pytest.raises(ValueError, match="opset .* is not supported: use 16.."):
            check_onnx_opset(opset)


def op_types(graph) -> set[str]:
    """Node types of an ONNX graph and its subgraphs (batched_nms's empty-input test is an If)."""
    types = set()
    for node in graph.node:
        types.add(node.op_type)
        for attribute in node.attribute:
            if attribute.g.node:
                types |= op_types(attribute.g)
    return types


def run_tool(args, shapes_dir, tmp_path, env=None):
    overrides = tiny_overrides(shapes_dir, tmp_path / "run") + ["model.postprocess.score_thresh=0.02"]
    return subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "export.py"), "--config",
                           str(REPO_ROOT / "configs" / "shapes_R18.yaml"), *args, *overrides],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture
def weights(tiny_config, tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(tiny_model(tiny_config).state_dict(), path)
    return path


def test_tool_writes_a_checked_file(shapes_dir, tmp_path, weights):
    # ONNX, the format with more to go wrong; TorchScript where onnx is not installed
    fmt = "onnx" if importlib.util.find_spec("onnx") else "torchscript"
    output = tmp_path / "out" / f"model.{fmt}"
    result = run_tool(["--weights", str(weights), "--format", fmt, "--output", str(output)],
                      shapes_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    assert output.is_file()
    assert "dynamic batch, height and width" in result.stdout
    if "not checked" not in result.stdout:
        assert "another label 0, num_detections differ 0" in result.stdout
        assert "in any order 0" in result.stdout


@pytest.mark.parametrize("case", ["height", "no_onnx"])
def test_tool_errors_are_one_line(shapes_dir, tmp_path, weights, case):
    args = ["--weights", str(weights), "--output", str(tmp_path / "model.onnx"), "--format", "onnx"]
    env = None
    if case == "height":
        args += ["--height", "100"]
        expected = "multiple of data.size_divisibility (128)"
    else:  # an `onnx` package that fails to import stands in for a missing one
        blocker = tmp_path / "blocker" / "onnx"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("raise ImportError('onnx is not installed')\n")
        env = {"PYTHONPATH": str(blocker.parent)}
        expected = "pip install -e .[export]"
    result = run_tool(args, shapes_dir, tmp_path, env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert not (tmp_path / "model.onnx").exists()


def _outputs():
    """(boxes, scores, labels, num_detections) of 2 images, D = 4: 3 and 2 detections; the first
    two of image 0 tie in score with different labels."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 40, 40], [5, 5, 15, 25], [0, 0, 0, 0]],
                          [[1.0, 2, 30, 30], [50, 50, 60, 70], [0, 0, 0, 0], [0, 0, 0, 0]]])
    scores = torch.tensor([[0.9, 0.9, 0.5, 0.0], [0.8, 0.3, 0.0, 0.0]])
    labels = torch.tensor([[1, 2, 0, -1], [3, 3, -1, -1]])
    return boxes, scores, labels, torch.tensor([3, 2])


def test_check_passes_swapped_ties_and_fails_on_missing_or_moved_detections():
    expected = _outputs()
    assert mismatch(compare_outputs(expected, _outputs())) == ""
    boxes, scores, labels, counts = _outputs()  # score tie: rows 0 and 1 of image 0 swapped
    boxes[0, [0, 1]], labels[0, [0, 1]] = boxes[0, [1, 0]], labels[0, [1, 0]]
    diff = compare_outputs(expected, (boxes, scores, labels, counts))
    assert diff["labels"] == 2 and diff["unmatched"] == 0 and mismatch(diff) == ""
    boxes, scores, labels, counts = _outputs()  # image 1's second detection dropped
    boxes[1, 1], scores[1, 1], labels[1, 1], counts[1] = 0.0, 0.0, -1, 1
    diff = compare_outputs(expected, (boxes, scores, labels, counts))
    assert diff["unmatched"] == 1 and diff["num_detections"] == 1
    assert mismatch(diff) == ("num_detections differ for 1 image(s); 1 detection(s) have no "
                              "counterpart of the same label with box and score within tolerance")
    boxes, scores, labels, counts = _outputs()  # same counts, one box moved by a pixel
    boxes[0, 2, 0] += 1.0
    diff = compare_outputs(expected, (boxes, scores, labels, counts))
    assert diff["num_detections"] == 0 and diff["unmatched"] == 2  # one on each side
    assert mismatch(diff).startswith("2 detection(s) have no counterpart")
    boxes, scores, labels, counts = _outputs()  # another label for a detection
    labels[1, 0] = 2
    assert mismatch(compare_outputs(expected, (boxes, scores, labels, counts))).startswith("2 detection(s)")


def test_tool_exits_1_when_the_file_loses_a_detection(shapes_dir, tmp_path, weights, monkeypatch, capsys):
    """tools/export.py in-process, with an "exported" model that drops one detection of eager's."""
    from retinanet import export

    spec = importlib.util.spec_from_file_location("export_tool", REPO_ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def lossy_export(model, example, path):
        def run(x):
            boxes, scores, labels, counts = (t.clone() for t in model(x))
            image = int(torch.nonzero(counts)[0])  # an image with a detection: drop its last
            last = int(counts[image]) - 1
            boxes[image, last], scores[image, last], labels[image, last] = 0.0, 0.0, -1
            counts[image] -= 1
            return boxes, scores, labels, counts
        return run

    monkeypatch.setattr(export, "export_torchscript", lossy_export)
    overrides = tiny_overrides(shapes_dir, tmp_path / "run") + ["model.postprocess.score_thresh=0.02"]
    monkeypatch.setattr(sys, "argv", ["export.py", "--config", str(REPO_ROOT / "configs" / "shapes_R18.yaml"),
                                      "--weights", str(weights), "--format", "torchscript",
                                      "--output", str(tmp_path / "model.pt"), *overrides])
    assert tool.main() == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'model.pt'} does not reproduce eager")
    assert "num_detections differ for 1 image(s); 1 detection(s) have no counterpart" in err[0]


def test_tool_without_config_needs_a_trainer_checkpoint(tmp_path, weights, monkeypatch):
    """--config is optional for a checkpoint that carries one (tests/test_from_checkpoint.py); a
    bare state dict without it is a ConfigError asking for it, before anything is written."""
    spec = importlib.util.spec_from_file_location("export_tool", REPO_ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "argv", ["export.py", "--weights", str(weights), "--format", "torchscript",
                                      "--output", str(tmp_path / "model.pt")])
    with pytest.raises(ConfigError, match=re.escape(f"{weights} carries no config") + r".*\(--config"):
        tool.main()
    assert not (tmp_path / "model.pt").exists()
