"""INT8 for CPU: ONNX Runtime static quantization of an exported `Predictor` graph.

    files = calibration_files("train", detector.config, limit=64)   # or a folder of images
    quantize_onnx("model.onnx", "model_int8.onnx", calibration_batches(detector, files))

QDQ format: int8 weights, one scale per output channel, uint8 activations (onnxruntime's fast
U8S8 form on x86), activation ranges from the calibration images, preprocessed by the
detector's own transform and collate (what `Detector.predict` runs). Only the network's
convolutions are quantized (`network_nodes`): the anchors, top-k, box decoding and NMS stay
float32, and so do GroupNorm and the element-wise ops between convolutions (quantizing those
added more QuantizeLinear / DequantizeLinear pairs than it saved; see docs/deployment.md).
Needs onnx and onnxruntime (pip install -e .[export]).
"""
from __future__ import annotations

import dataclasses
import itertools
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .boxes import pairwise_iou
from .data import build_dataset
from .detector import Detector
from .errors import ConfigError
from .export import onnx_session, per_image_detections, run_onnx
from .inference import expand_inputs, read_rgb

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
_METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # onnxruntime's
SPLITS = ("train", "val")
QUANTIZED_OP_TYPES = ("Conv",)
# Convolutions that may be left in float: the stem (it sees the raw normalised pixels) and the
# heads' last convolutions (their outputs are the logits and box deltas themselves).
KEEP_FLOAT = ("stem", "outputs")


def calibration_files(source: str | Path, config, limit: int | None = None) -> list[Path]:
    """The images to calibrate on: a split name of `config` ("train" or "val": the files its
    annotations list) or a folder, file or glob of images (retinanet.inference.expand_inputs);
    at most `limit`, evenly spaced over the sorted list so that they cover it."""
    if str(source) in SPLITS:
        split = getattr(config.data, str(source))
        # the split read as the evaluation reads val: its images listed, nothing augmented
        data = dataclasses.replace(config.data, val=split)
        dataset = build_dataset(data, train=False)
        files = [dataset.image_path(i) for i in dataset.image_ids]
    else:
        files, _ = expand_inputs(source)
    if limit is not None:
        if limit <= 0:
            raise ConfigError(f"--calibration-images {limit}: give a positive number of images")
        step = max(len(files) / limit, 1.0)
        files = [files[int(i * step)] for i in range(min(limit, len(files)))]
    return files


def calibration_batches(detector: Detector, files: Sequence[Path]) -> Iterator[np.ndarray]:
    """One (1, 3, H, W) float32 array per file: images of any size calibrate at their own."""
    for path in files:
        yield detector.preprocess([read_rgb(path)]).images.cpu().numpy()


def network_nodes(model) -> set[str]:
    """Names of the nodes of an ONNX graph that compute the network: every Conv and every node
    a Conv depends on. The postprocessing (anchors from shapes, top-k, decoding, NMS) feeds no
    convolution, so it is none of them."""
    producer = {output: node for node in model.graph.node for output in node.output}
    seen: set[str] = set()
    stack = [node for node in model.graph.node if node.op_type == "Conv"]
    while stack:
        node = stack.pop()
        if node.name in seen:
            continue
        seen.add(node.name)
        stack += [producer[name] for name in node.input if name in producer]
    return seen


def float_convolutions(model, keep: Iterable[str]) -> set[str]:
    """Names of the Conv nodes that `keep` ("stem", "outputs") leaves in float: the first Conv
    (the graph is in topological order) and the Convs whose output no other Conv depends on."""
    keep = set(keep)
    unknown = keep - set(KEEP_FLOAT)
    if unknown:
        raise ConfigError(f"cannot keep {sorted(unknown)} in float: choose from {', '.join(KEEP_FLOAT)}")
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    names = set()
    if "stem" in keep and convs:
        names.add(convs[0].name)
    if "outputs" in keep:
        consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        for conv in convs:  # a Conv whose output reaches no Conv through the network's nodes
            frontier, feeds_conv, seen = list(conv.output), False, set()
            while frontier and not feeds_conv:
                tensor = frontier.pop()
                for node in consumers.get(tensor, []):
                    if node.name in seen:
                        continue
                    seen.add(node.name)
                    feeds_conv |= node.op_type == "Conv"
                    frontier += list(node.output)
            if not feeds_conv:
                names.add(conv.name)
    return names


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an iterator of input arrays."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self.batches = iter(batches)
        self.count = 0

    def get_next(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.count += 1
        return {"images": batch}


def quantize_onnx(fp32_path: str | Path, output: str | Path, batches: Iterable[np.ndarray], *,
                  method: str = "minmax", per_channel: bool = True, reduce_range: bool = False,
                  keep_float: Sequence[str] = ()) -> dict:
    """Writes the static INT8 (QDQ) form of the exported graph `fp32_path` to `output`.

    The graph is first pre-processed (onnxruntime's quant_pre_process: BatchNorm folded into the
    convolutions, so that per-channel scales see the folded weights; its symbolic shape
    inference cannot follow NMS's data-dependent shapes and is skipped). `batches`: the model's
    input arrays (N, 3, H, W) float32, as `calibration_batches` makes them. `method`: one of
    CALIBRATION_METHODS. Returns {"calibration_images", "quantized_convs", "float_convs"}.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method {method!r}: choose from {', '.join(CALIBRATION_METHODS)}")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        kept = float_convolutions(model, keep_float)
        nodes = sorted(network_nodes(model) - kept)
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            raise ConfigError("no calibration images: give a folder of images or a split name")
        reader = _Reader(itertools.chain([first], batches))
        quantize_static(str(prepared), str(output), reader, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OP_TYPES), nodes_to_quantize=nodes,
                        per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, _METHOD_NAMES[method]))
        convs = sum(node.op_type == "Conv" for node in model.graph.node)
    return {"calibration_images": reader.count, "quantized_convs": convs - len(kept),
            "float_convs": len(kept)}



def detection_overlap(reference: Sequence[dict], actual: Sequence[dict], *, score_thresh: float = 0.3,
                      iou_thresh: float = 0.5) -> tuple[int, int]:
    """Per image {"boxes" (N, 4), "scores" (N,), "labels" (N,)} of a reference (float32) and of
    another model -> (reference detections with score >= score_thresh, how many of them have a
    detection of the same label in `actual` with score >= score_thresh / 2 and IoU >= iou_thresh).
    The halved threshold: a score that rounding moved across the line is not a lost detection."""
    total = found = 0
    for ref, other in zip(reference, actual):
        keep = ref["scores"] >= score_thresh
        boxes, labels = ref["boxes"][keep], ref["labels"][keep]
        near = other["scores"] >= score_thresh / 2
        total += len(labels)
        if len(labels) and near.any():
            iou = pairwise_iou(boxes.float(), other["boxes"][near].float())  # (N, M)
            same = labels[:, None] == other["labels"][near][None, :]
            found += int(((iou >= iou_thresh) & same).any(1).sum())
    return total, found


def compare_with_float(detector: Detector, fp32_path: str | Path, int8_path: str | Path,
                       files: Sequence[Path], **overlap) -> tuple[int, int]:
    """`detection_overlap` of the INT8 file against the float32 one on `files`, one at a time."""
    sessions = onnx_session(fp32_path), onnx_session(int8_path)
    reference, actual = [], []
    for path in files:
        batch = detector.preprocess([read_rgb(path)]).images.cpu()
        size = [tuple(batch.shape[-2:])]
        for out, session in zip((reference, actual), sessions):
            out += per_image_detections(run_onnx(session, batch), size, size)
    return detection_overlap(reference, actual, **overlap)
