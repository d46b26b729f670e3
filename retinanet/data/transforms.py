"""Image and box transforms: an albumentations pipeline for training, torchvision's
preprocessing for evaluation and inference.

Training boxes travel as pascal_voc (xyxy pixels) with their labels in `label_fields`, clipped to
the image, and boxes that become empty are dropped together with their labels. Test-time
preprocessing is torch's bilinear resize of the normalised image, exactly as torchvision's
GeneralizedRCNNTransform does it, so that torchvision-trained weights give torchvision's
detections (and it runs on tensors as well as on decoded files).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import

import albumentations as A  # noqa: E402
from albumentations.augmentations.geometric.resize import MaxSizeTransform  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ..boxes import MIN_BOX_SIDE, box_areas_valid, resize_scale  # noqa: E402


class ResizeShortestEdge(MaxSizeTransform):
    """Scales the shortest side to one of `min_sizes` (drawn per image) unless the longest side
    would then exceed `max_size`, in which case the longest side is `max_size` (detectron2's
    ResizeShortestEdge, torchvision's GeneralizedRCNNTransform)."""

    def __init__(self, min_sizes: Sequence[int], max_size: int, p: float = 1.0):
        super().__init__(max_size=None, max_size_hw=(None, None), interpolation=cv2.INTER_LINEAR, p=p)
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        target = self.min_sizes[0] if len(self.min_sizes) == 1 else self.py_random.choice(self.min_sizes)
        return {"scale": resize_scale(height, width, target, self.max_size)}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_sizes", "max_size")


class DetectionTransform:
    """Callable on a dataset sample: resizes / augments image and boxes, normalises the image.

    Output sample: image (3, H, W) float32 normalised, boxes (n, 4) float32 tensor xyxy in the
    resized image, labels (n,) int64 tensor, image_size (H, W), plus the input's image_id and
    orig_size.
    """

    def __init__(self, *, min_sizes: Sequence[int], max_size: int, mean: Sequence[float],
                 std: Sequence[float], hflip_prob: float = 0.0, color_jitter: dict | None = None):
        steps: list[A.BasicTransform] = [ResizeShortestEdge(min_sizes, max_size)]
        if hflip_prob > 0:
            steps.append(A.HorizontalFlip(p=hflip_prob))
        if color_jitter and color_jitter.get("prob", 0) > 0:
            steps.append(A.ColorJitter(brightness=color_jitter["brightness"],
                                       contrast=color_jitter["contrast"],
                                       saturation=color_jitter["saturation"],
                                       hue=color_jitter["hue"], p=color_jitter["prob"]))
        steps.append(A.Normalize(mean=mean, std=std, max_pixel_value=255.0))
        self.pipeline = A.Compose(
            steps,
            bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True,
                                     min_area=0.0, min_width=0.0, min_height=0.0))

    def set_seed(self, seed: int) -> None:
        """albumentations keeps its own generators (np.random / random seeds do not reach them)."""
        self.pipeline.set_random_seed(seed)

    def __call__(self, sample: dict) -> dict:
        boxes, labels = sample["boxes"], sample["labels"]
        if len(boxes) != len(labels):
            raise ValueError(f"image {sample.get('image_id')}: {len(boxes)} boxes but {len(labels)} labels")
        height, width = sample["image"].shape[:2]
        # Clip first: float round-off just past the edge makes albumentations raise.
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4).clip(0, [width, height, width, height])
        empty = ~box_areas_valid(boxes, MIN_BOX_SIDE)
        if empty.any():
            raise ValueError(f"image {sample.get('image_id')}: box {boxes[empty][0].tolist()} is under "
                             f"{MIN_BOX_SIDE} px wide or high inside the {width}x{height} image; drop "
                             "such boxes before the transform (CocoDetection does, with a counted warning)")
        out = self.pipeline(image=sample["image"], bboxes=boxes, labels=np.asarray(labels, np.int64))
        image = torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1)))
        out_boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        out_labels = np.asarray(out["labels"], np.int64).reshape(-1)
        if len(out_boxes) != len(out_labels):  # labels must never drift from their boxes
            raise RuntimeError(f"image {sample.get('image_id')}: augmentation returned "
                               f"{len(out_boxes)} boxes and {len(out_labels)} labels")
        # albumentations keeps boxes clipped to zero area (min_area is inclusive): drop them here,
        # with their labels, so that only boxes with an extent reach the matcher.
        nonempty = box_areas_valid(out_boxes)
        out_boxes, out_labels = torch.as_tensor(out_boxes[nonempty]), torch.as_tensor(out_labels[nonempty])
        return {"image": image, "boxes": out_boxes, "labels": out_labels,
                "image_id": sample["image_id"], "orig_size": tuple(sample["orig_size"]),
                "image_size": (image.shape[1], image.shape[2])}


def rgb_to_tensor(image: np.ndarray, device: torch.device | str | None = None) -> Tensor:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1], on `device` (moved there as uint8,
    a quarter of the bytes, before the conversion)."""
    pixels = torch.from_numpy(np.ascontiguousarray(image))
    return pixels.to(device).permute(2, 0, 1).float() / 255


class EvalTransform:
    """Test-time preprocessing on a sample whose image is RGB uint8 (H, W, 3) numpy or float
    (3, H, W) in [0, 1] torch: normalise with mean/std, then scale by
    min(min_size / shorter side, max_size / longer side) with torch's bilinear interpolation
    (align_corners False, output size floor(size * scale)), as torchvision does. Boxes, if any,
    are scaled to the resized image. Output sample: as `DetectionTransform`'s.
    """

    def __init__(self, *, min_size: int, max_size: int, mean: Sequence[float], std: Sequence[float]):
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.mean = torch.tensor(list(mean), dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(list(std), dtype=torch.float32)[:, None, None]

    def set_seed(self, seed: int) -> None:
        """Nothing random happens at test time."""

    def __call__(self, sample: dict) -> dict:
        image = sample["image"]
        if isinstance(image, np.ndarray):
            image = rgb_to_tensor(image)
        image = (image.float() - self.mean.to(image.device)) / self.std.to(image.device)
        height, width = image.shape[-2:]
        scale = resize_scale(height, width, self.min_size, self.max_size)
        if scale != 1.0:
            image = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                                  recompute_scale_factor=True, align_corners=False)[0]
        new_h, new_w = image.shape[-2:]
        boxes = torch.as_tensor(np.asarray(sample.get("boxes", np.zeros((0, 4))), np.float32)).reshape(-1, 4)
        boxes = boxes * torch.tensor([new_w / width, new_h / height] * 2, dtype=torch.float32)
        labels = torch.as_tensor(np.asarray(sample.get("labels", np.zeros(0)), np.int64)).reshape(-1)
        return {"image": image, "boxes": boxes, "labels": labels, "image_id": sample["image_id"],
                "orig_size": tuple(sample["orig_size"]), "image_size": (int(new_h), int(new_w))}


def build_transform(data_cfg, *, train: bool) -> DetectionTransform | EvalTransform:
    if train:
        jitter = data_cfg.color_jitter
        return DetectionTransform(min_sizes=data_cfg.min_size, max_size=data_cfg.max_size,
                                  mean=data_cfg.mean, std=data_cfg.std, hflip_prob=data_cfg.hflip_prob,
                                  color_jitter=vars(jitter) if jitter.prob > 0 else None)
    return EvalTransform(min_size=data_cfg.test_min_size, max_size=data_cfg.test_max_size,
                         mean=data_cfg.mean, std=data_cfg.std)
