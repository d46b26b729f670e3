"""Writes the `Predictor` (retinanet/predictor.py: network, anchors, decoding and NMS in one graph,
images (B, 3, H, W) normalised and padded in, padded detections out) as ONNX or TorchScript, and
checks a written file against eager PyTorch:

    model = Predictor(detector.model, postprocessor=detector.postprocessor)
    export_onnx(model, example_images, "model.onnx")        # dynamic batch, height and width
    export_torchscript(model, example_images, "model.pt")   # dynamic too (see export_torchscript)
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .boxes import clip_boxes
from .errors import ConfigError
from .predictor import Predictor

OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
# ScatterElements with reduction="add" (the per-image counts) needs opset 16.
MIN_ONNX_OPSET = 16


def prepare_for_export(model: Predictor) -> Predictor:
    """Eval mode (BatchNorm statistics, no dropout) and contiguous weights, in place: the export
    graphs carry no memory-format conversions."""
    return model.eval().to(memory_format=torch.contiguous_format)


def export_onnx(model: Predictor, images: Tensor, path: str | Path, *, opset: int = 17) -> None:
    """Writes `model` as ONNX with dynamic batch, height and width (TorchScript-based exporter).

    `images` (B, 3, H, W) is the example the graph is traced with; NMS becomes the ONNX
    NonMaxSuppression op through torchvision's registered symbolic. Under the tracer
    `batched_nms` always uses its coordinate-offset form, which eager PyTorch uses only up to
    1000 candidates (CPU): beyond, a box within float rounding of the NMS threshold can be kept
    by one and dropped by the other. Raises ModuleNotFoundError without the onnx package.
    """
    require_onnx()
    check_onnx_opset(opset)
    model = prepare_for_export(model)
    dynamic = {"images": {0: "batch", 2: "height", 3: "width"}}
    dynamic.update({name: {0: "batch"} for name in OUTPUT_NAMES})
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(model, (images,), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=dynamic, do_constant_folding=True)


def export_torchscript(model: Predictor, images: Tensor, path: str | Path) -> torch.jit.ScriptModule:
    """Writes `model` as TorchScript and returns the loaded-equivalent ScriptModule.

    The postprocessing (anchors, top-k, threshold, decoding, NMS, padding) is scripted, so its
    data-dependent parts are real control flow. The network (backbone, FPN, head) cannot be
    scripted (FPN indexes its ModuleLists with a loop variable) and is traced with `images`:
    convolutions have no shape logic, and the reshapes and FPN's upsampling read their sizes at
    run time, so the traced network also takes other batch sizes and image sizes (tests run it
    at two). Traced on the CPU, FPN keeps its CPU upsampling path on any device.
    """
    model = prepare_for_export(model)
    with torch.no_grad(), warnings.catch_warnings():
        # GroupNorm's check for one value per channel reads the example's shape (a harmless
        # TracerWarning: it only matters for inputs of one pixel).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="torch.nn.functional")
        # No check_trace: it would trace a second time; callers compare outputs.
        network = torch.jit.trace_module(model.network, {"forward_levels": (images,)}, strict=False,
                                         check_trace=False)
    scriptable = copy.copy(model)  # same submodules and settings, a network that scripts
    scriptable._modules = dict(model._modules, network=network)
    scripted = torch.jit.script(scriptable)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    scripted.save(str(path))
    return scripted


def check_onnx_opset(opset: int) -> None:
    """ConfigError unless the graph and torch's TorchScript-based exporter both support `opset`."""
    # torch 2.15's exporter stops at 20; the constant is private, hence the fallback.
    constants = getattr(torch.onnx, "_constants", None)
    highest = getattr(constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    if not MIN_ONNX_OPSET <= opset <= highest:
        raise ConfigError(f"ONNX opset {opset} is not supported: use {MIN_ONNX_OPSET}..{highest} "
                          f"(the per-image counts need ScatterElements with reduction, opset "
                          f"{MIN_ONNX_OPSET}; torch's TorchScript-based exporter stops at {highest})")


def require_onnx() -> None:
    """ModuleNotFoundError with the install command when the onnx package is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError as error:
        raise ModuleNotFoundError("ONNX export needs the onnx package (and onnxruntime to check "
                                  "the file): pip install -e .[export]") from error


def onnx_session(path: str | Path, threads: Optional[int] = None):
    """An onnxruntime CPU session of an exported file, with `threads` intra-op threads (default
    torch's: a benchmark then gives every format the same cores)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs an exported file (a path, or an `onnx_session`) with onnxruntime (CPU) -> the four
    outputs as tensors."""
    session = path_or_session
    if isinstance(session, (str, Path)):
        session = onnx_session(session)
    outputs = session.run(list(OUTPUT_NAMES), {"images": images.detach().cpu().numpy()})
    boxes, scores, labels, counts = (torch.from_numpy(o) for o in outputs)
    return boxes, scores, labels, counts


def per_image_detections(outputs: Tuple[Tensor, ...], image_sizes: Sequence[Tuple[int, int]],
                         output_sizes: Sequence[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
    """An exported graph's padded outputs for a collated batch -> per image {"boxes" (N, 4) xyxy
    clipped to that image's resized size, then rescaled to `output_sizes` (h, w), "scores" (N,),
    "labels" (N,)}: what `PostProcessor.__call__` returns. The graph clips to the padded size
    before NMS, so a box that reaches into the padding may be kept or dropped differently
    (images whose resized size is their padded size, none)."""
    boxes, scores, labels, counts = (t.detach().cpu() for t in outputs)
    result = []
    for i, ((height, width), (out_h, out_w)) in enumerate(zip(image_sizes, output_sizes)):
        n = int(counts[i])
        box = clip_boxes(boxes[i, :n], torch.tensor(float(height)), torch.tensor(float(width)))
        # the same float32 arithmetic as PostProcessor's rescaling: (sx, sy, sx, sy)
        scale = (torch.tensor([out_h, out_w], dtype=torch.float32)
                 / torch.tensor([height, width], dtype=torch.float32))[[1, 0, 1, 0]]
        result.append({"boxes": box * scale, "scores": scores[i, :n], "labels": labels[i, :n]})
    return result


def compare_outputs(expected: Tuple[Tensor, ...], actual: Tuple[Tensor, ...], *,
                    box_tol: float = 1e-3, score_tol: float = 1e-5) -> dict[str, float]:
    """Two (boxes, scores, labels, num_detections) results -> {"boxes", "scores": max abs
    difference row by row, "labels", "num_detections": entries that differ, "unmatched":
    detections of either side with no detection of the same image and label on the other
    within box_tol px and score_tol}. "unmatched" ignores the order, which float rounding can
    swap between detections whose scores tie to within ~1e-7 (onnxruntime's sigmoid is not
    torch's), and which then shows as "labels" differences."""
    boxes, scores, labels, counts = (t.detach().cpu() for t in expected)
    boxes_b, scores_b, labels_b, counts_b = (t.detach().cpu() for t in actual)
    if boxes.shape != boxes_b.shape:
        raise ValueError(f"output shapes differ: {tuple(boxes.shape)} vs {tuple(boxes_b.shape)}")
    close = ((labels[:, :, None] == labels_b[:, None, :])  # (B, D, D): expected row, actual row
             & ((boxes[:, :, None] - boxes_b[:, None]).abs().amax(-1) <= box_tol)
             & ((scores[:, :, None] - scores_b[:, None]).abs() <= score_tol))
    unmatched = ((labels >= 0) & ~close.any(2)).sum() + ((labels_b >= 0) & ~close.any(1)).sum()
    return {"boxes": float((boxes - boxes_b).abs().max()) if boxes.numel() else 0.0,
            "scores": float((scores - scores_b).abs().max()) if scores.numel() else 0.0,
            "labels": int((labels != labels_b).sum()),
            "num_detections": int((counts != counts_b).sum()),
            "unmatched": int(unmatched)}


def mismatch(diff: dict[str, float]) -> str:
    """What makes a `compare_outputs` result a failed check, on one line ("" when it passes):
    images whose detection counts differ, or detections without a counterpart on the other side.
    Rows that differ in order only (labels or boxes row by row) pass: score ties may swap them."""
    problems = []
    if diff["num_detections"]:
        problems.append(f"num_detections differ for {diff['num_detections']} image(s)")
    if diff["unmatched"]:
        problems.append(f"{diff['unmatched']} detection(s) have no counterpart of the same label "
                        "with box and score within tolerance")
    return "; ".join(problems)
