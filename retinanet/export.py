"""Export-friendly inference: padded images in, fixed-shape detections out, with anchors, box
decoding and NMS inside the graph, for ONNX and TorchScript.

    detector = Detector.from_config("configs/shapes_R18.yaml", weights="model_final.pth", device="cpu")
    model = InferenceModel.from_postprocessor(detector.model, detector.postprocessor)
    export_onnx(model, example_images, "model.onnx")        # dynamic batch, height and width
    export_torchscript(model, example_images, "model.pt")   # dynamic too (see export_torchscript)

Input: images (B, 3, H, W), normalised and padded like `Collate` does, with H and W multiples of
the config's data.size_divisibility; no resize or normalisation happens inside. Outputs, with
D = max_detections, best first within each image:
    boxes (B, D, 4) float32 xyxy in the input's pixels, clipped to the padded size (H, W);
    scores (B, D) float32; labels (B, D) int64 in 0..K-1; num_detections (B,) int64.
Rows from num_detections on are padding: zero boxes and scores, label -1. The caller clips the
boxes to its image's resized size and rescales them by original / resized size, which
`PostProcessor` does itself from `image_sizes` and `output_sizes`.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .boxes import BoxCoder, clip_boxes
from .errors import ConfigError
from .model import AnchorGenerator, RetinaNet
from .postprocess import PostProcessor

OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")
# ScatterElements with reduction="add" (the per-image counts) needs opset 16.
MIN_ONNX_OPSET = 16


class DenseOutputs(nn.Module):
    """The network without anchors: backbone -> FPN -> head, one level at a time.

    forward(images (B, 3, H, W)) -> (cls_logits [(B, A_l, K)], box_deltas [(B, A_l, 4)],
    features [(B, C, H_l, W_l)]), one entry per level, A_l = H_l * W_l * anchors per location.
    The head runs on each level alone (the same convolutions `RetinaHead.forward` runs in its
    loop), so no per-level split of concatenated outputs has to be computed from shapes; the
    features come back so that the anchors can be built from their shapes.
    """

    def __init__(self, model: RetinaNet):
        super().__init__()
        self.backbone, self.fpn, self.head = model.backbone, model.fpn, model.head

    def forward(self, images: Tensor) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        features = self.fpn(self.backbone(images))
        cls_logits: List[Tensor] = []
        box_deltas: List[Tensor] = []
        for feature in features:
            logits, deltas = self.head([feature])
            cls_logits.append(logits)
            box_deltas.append(deltas)
        return cls_logits, box_deltas, features


class ShapeAnchors(nn.Module):
    """`AnchorGenerator`'s anchors computed from the feature maps' shapes at run time.

    forward(features [(B, C, H_l, W_l)], images (B, 3, H, W)) -> [(H_l * W_l * A, 4)] xyxy
    float32 per level, equal to `AnchorGenerator(sizes, device, image_size)` split by level
    (same base anchors, `offset`, `level_sizes`, `stride_from_image`, same ops in the same order).
    AnchorGenerator caches by Python ints, which a traced graph would freeze at the example's
    size; here every size is read from a tensor shape, so an ONNX graph keeps H and W dynamic.
    """

    def __init__(self, generator: AnchorGenerator):
        super().__init__()
        # (L, A, 4): every level has the same number of anchor types (AnchorGenerator checks).
        self.register_buffer("base_anchors", torch.stack(generator.base_anchors), persistent=False)
        self.strides: List[int] = list(generator.strides)
        self.offset = float(generator.offset)
        self.stride_from_image = bool(generator.stride_from_image)

    def forward(self, features: List[Tensor], images: Tensor) -> List[Tensor]:
        anchors: List[Tensor] = []
        for level, feature in enumerate(features):
            height, width = feature.shape[-2], feature.shape[-1]
            if self.stride_from_image:  # torchvision's padded size // grid size, per axis
                stride_y = images.shape[-2] // height
                stride_x = images.shape[-1] // width
            else:
                stride_y = self.strides[level]
                stride_x = self.strides[level]
            device = self.base_anchors.device
            xs = (torch.arange(width, dtype=torch.float32, device=device) + self.offset) * stride_x
            ys = (torch.arange(height, dtype=torch.float32, device=device) + self.offset) * stride_y
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + self.base_anchors[level][None]).reshape(-1, 4))
        return anchors


class InferenceModel(nn.Module):
    """forward(images (B, 3, H, W)) -> (boxes (B, D, 4), scores (B, D), labels (B, D) int64,
    num_detections (B,) int64); see the module docstring for the conventions.

    The same steps as `PostProcessor` with the same ordering rules, so that eager outputs equal
    its detections (clipped to the padded size): per level, top-k of the ranking
    (k = min(topk_candidates, A_l * K)), score threshold, decode with the coder's clamp; clip;
    one `batched_nms` over the batch grouped by image and class; the best `max_detections` of
    each image. The code runs eagerly, under `torch.jit.script` (with the network traced, see
    `export_torchscript`) and under the tracer of `torch.onnx.export`, where every size is a
    tensor so that batch, height and width stay dynamic.
    """

    def __init__(self, model: RetinaNet, *, box_coder: BoxCoder, score_thresh: float = 0.05,
                 topk_candidates: int = 1000, nms_thresh: float = 0.5, max_detections: int = 100,
                 activation: str = "sigmoid"):
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        self.network = DenseOutputs(model)
        self.anchors = ShapeAnchors(model.anchor_generator)
        self.num_classes = int(model.num_classes)
        wx, wy, ww, wh = box_coder.weights
        self.box_weights: Tuple[float, float, float, float] = (wx, wy, ww, wh)
        self.box_clamp = float(box_coder.clamp)
        self.score_thresh = float(score_thresh)
        self.topk_candidates = int(topk_candidates)
        self.nms_thresh = float(nms_thresh)
        self.max_detections = int(max_detections)
        self.softmax = activation == "softmax"

    @classmethod
    def from_postprocessor(cls, model: RetinaNet, postprocessor: PostProcessor) -> "InferenceModel":
        """The settings of a `PostProcessor` (e.g. a Detector's), applied in the graph."""
        return cls(model, box_coder=postprocessor.box_coder, score_thresh=postprocessor.score_thresh,
                   topk_candidates=postprocessor.topk_candidates, nms_thresh=postprocessor.nms_thresh,
                   max_detections=postprocessor.max_detections, activation=postprocessor.activation)

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        cls_logits, box_deltas, features = self.network(images)
        anchors = self.anchors(features, images)
        all_boxes: List[Tensor] = []
        all_scores: List[Tensor] = []
        all_labels: List[Tensor] = []
        all_images: List[Tensor] = []
        for level, logits in enumerate(cls_logits):
            boxes, scores, labels, image_idx = self._candidates(logits, box_deltas[level], anchors[level])
            all_boxes.append(boxes)
            all_scores.append(scores)
            all_labels.append(labels)
            all_images.append(image_idx)
        boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
        labels, image_idx = torch.cat(all_labels), torch.cat(all_images)
        # (H, W) as a tensor in every mode: eager shapes are ints, traced ones 0-dim tensors
        size = torch._shape_as_tensor(images)[-2:].to(device=boxes.device, dtype=torch.float32)
        boxes = clip_boxes(boxes, size[0], size[1])
        keep = batched_nms(boxes, scores, image_idx * self.num_classes + labels, self.nms_thresh)
        return self._pad_per_image(boxes[keep], scores[keep], labels[keep], image_idx[keep],
                                   images.shape[0])

    def _candidates(self, logits: Tensor, deltas: Tensor,
                    anchors: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """One level: logits (B, A_l, K), deltas (B, A_l, 4), anchors (A_l, 4) -> boxes (n, 4),
        scores (n,), labels (n,), image_idx (n,) of the top-k above the threshold."""
        num_classes = logits.shape[-1]
        logits = logits.float()
        # Sigmoid is monotonic: rank raw logits and convert only the k kept (as PostProcessor).
        ranking = _softmax_scores(logits) if self.softmax else logits
        ranking = ranking.flatten(1)  # (B, A_l * K)
        top, flat_idx = ranking.topk(_topk_size(ranking, self.topk_candidates), dim=1)  # (B, k)
        scores = top if self.softmax else top.sigmoid()
        keep = scores > self.score_thresh
        image_idx = torch.arange(top.shape[0], device=top.device)[:, None].expand_as(flat_idx)[keep]
        flat_idx = flat_idx[keep]
        anchor_idx = torch.div(flat_idx, num_classes, rounding_mode="floor")
        boxes = _decode(deltas[image_idx, anchor_idx], anchors[anchor_idx], self.box_weights,
                        self.box_clamp)
        return boxes, scores[keep], flat_idx % num_classes, image_idx

    def _pad_per_image(self, boxes: Tensor, scores: Tensor, labels: Tensor, image_idx: Tensor,
                       batch: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Detections (N, ...) of the whole batch, by decreasing score -> the first
        max_detections of each image in (B, D, ...) slots, padded with zeros and label -1."""
        num_kept = image_idx.shape[0]
        limit = self.max_detections
        position = torch.arange(num_kept, device=image_idx.device)
        # Group by image, keeping the score order within each: the keys are unique, so any sort
        # (ONNX TopK is not stable) gives the order of PostProcessor's stable sort.
        order = torch.argsort(image_idx * num_kept + position)
        per_image = torch.zeros([batch], dtype=torch.int64, device=image_idx.device)
        per_image = per_image.scatter_add(0, image_idx, torch.ones_like(image_idx))  # (B,)
        first = per_image.cumsum(0) - per_image  # where each image starts in `order`
        image_sorted = image_idx[order]
        rank = position - first[image_sorted]
        fits = rank < limit
        slot = (image_sorted * limit + rank)[fits]
        source = order[fits]
        out_boxes = torch.zeros([batch * limit, 4], dtype=boxes.dtype, device=boxes.device)
        out_scores = torch.zeros([batch * limit], dtype=scores.dtype, device=scores.device)
        out_labels = torch.full([batch * limit], -1, dtype=torch.int64, device=labels.device)
        out_boxes[slot] = boxes[source]
        out_scores[slot] = scores[source]
        out_labels[slot] = labels[source]
        return (out_boxes.reshape(batch, limit, 4), out_scores.reshape(batch, limit),
                out_labels.reshape(batch, limit), per_image.clamp(max=limit))


def _softmax_scores(logits: Tensor) -> Tensor:
    """(B, A_l, K) -> (B, A_l, K) softmax probabilities over K + 1 classes, background logit 0
    (PostProcessor._softmax_scores, written with shape-free ops)."""
    background = torch.zeros_like(logits[..., :1])
    return torch.cat([logits, background], dim=-1).softmax(dim=-1)[..., :-1]


def _decode(deltas: Tensor, anchors: Tensor, weights: Tuple[float, float, float, float],
            clamp: float) -> Tensor:
    """`BoxCoder.decode` (a plain class, which TorchScript cannot call), op for op: (n, 4)
    deltas and anchors -> (n, 4) xyxy float32 boxes, dw and dh clamped before exp()."""
    deltas, anchors = deltas.float(), anchors.float()
    wx, wy, ww, wh = weights
    aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
    ax, ay = anchors[..., 0] + 0.5 * aw, anchors[..., 1] + 0.5 * ah
    cx = deltas[..., 0] / wx * aw + ax
    cy = deltas[..., 1] / wy * ah + ay
    w = torch.exp((deltas[..., 2] / ww).clamp(max=clamp)) * aw
    h = torch.exp((deltas[..., 3] / wh).clamp(max=clamp)) * ah
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def _topk_size(ranking: Tensor, topk: int) -> int:
    """min(topk, ranking.shape[1]); under the tracer a 0-dim tensor (which ops accept for an
    int), so that ONNX's TopK gets a k that follows the input size instead of the example's."""
    if not torch.jit.is_scripting():  # TorchScript skips this block, and its type
        if torch.jit.is_tracing():
            return torch.clamp(torch._shape_as_tensor(ranking)[1], max=topk)  # type: ignore[return-value]
    return min(topk, ranking.shape[1])


def prepare_for_export(model: InferenceModel) -> InferenceModel:
    """Eval mode (BatchNorm statistics, no dropout) and contiguous weights, in place: the export
    graphs carry no memory-format conversions."""
    return model.eval().to(memory_format=torch.contiguous_format)


def export_onnx(model: InferenceModel, images: Tensor, path: str | Path, *, opset: int = 17) -> None:
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


def export_torchscript(model: InferenceModel, images: Tensor, path: str | Path) -> torch.jit.ScriptModule:
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
        # No check_trace: it traces a second time (7 s for a ResNet-18); callers compare outputs.
        network = torch.jit.trace(model.network, (images,), strict=False, check_trace=False)
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


def run_onnx(path: str | Path, images: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Runs an exported file with onnxruntime (CPU) -> the four outputs as tensors."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(list(OUTPUT_NAMES), {"images": images.detach().cpu().numpy()})
    boxes, scores, labels, counts = (torch.from_numpy(o) for o in outputs)
    return boxes, scores, labels, counts


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
