"""The user-facing inference API.

    from retinanet import Detector
    detector = Detector.from_config("configs/shapes_R18.yaml", weights="runs/shapes_R18/model_final.pth")
    detections = detector.predict([rgb_uint8_image])   # [{"boxes", "scores", "labels", "category_ids"}]
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .compiling import CompiledOrNone
from .config import Config, load_config
from .data import Batch, Collate, build_transform, label_mapping, load_coco
from .data.transforms import rgb_to_tensor
from .errors import ConfigError, DataError
from .model import RetinaNet, RetinaNetOutput, build_model, use_fast_memory_format
from .model.fold import fold_batchnorm
from .model.winograd import use_winograd
from .predictor import PostProcessor, build_postprocessor
from .weights import load_model_weights


class Detector:
    """A RetinaNet with its test-time preprocessing and postprocessing, on one device."""

    def __init__(self, model: RetinaNet, *, transform: Callable[[dict], dict], postprocessor: PostProcessor,
                 size_divisibility: int, class_names: Sequence[str] | None = None,
                 label_to_cat_id: dict[int, int] | None = None, device: str | torch.device = "cpu",
                 channels_last: bool | None = None, compile: bool = False, winograd: bool = False):
        self.device = torch.device(device)
        self.model = use_fast_memory_format(model, self.device, channels_last)
        if compile and winograd and self.device.type == "cpu":
            # only the compiled graph computes by Winograd: the eager module (fallback, export)
            # still runs its convolutions directly, bit for bit (see model/winograd.py)
            self.model = use_winograd(self.model)
        # compile: torch.compile with inductor's weight freezing (weights prepacked once, bias /
        # ReLU / residual adds fused into the convolutions). The weights become constants of the
        # compiled graph, so this is for a model that no longer changes (from_config);
        # self.model stays the eager module (export). torch.compile(options={"freezing": True})
        # measured as not freezing: the setting is patched in around each call.
        self._compiled = CompiledOrNone(self.model, "model.compile_inference",
                                        inductor_config={"freezing": True}) if compile else None
        self.transform, self.postprocessor = transform, postprocessor
        self.collate = Collate(size_divisibility)
        num_classes = model.num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.label_to_cat_id = label_to_cat_id or {i: i + 1 for i in range(num_classes)}
        # label -> category id, -1 for labels that are no category (torchvision's "N/A" outputs)
        self._cat_id_lookup = torch.tensor([self.label_to_cat_id.get(i, -1) for i in range(num_classes)])

    @classmethod
    def from_config(cls, config: str | Path | Config, weights: str | Path | None = None,
                    overrides: Sequence[str] = (), device: str | None = None) -> "Detector":
        """Builds the model of `config` (a path or a Config) and loads `weights` (a trainer
        checkpoint or a bare state dict; default: the config's model.weights). Class names and
        category ids come from the config's validation (else training) annotations when that
        file exists."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        class_names, label_to_cat_id = _categories(cfg)
        num_classes = cfg.model.num_classes or (len(class_names) if class_names else None)
        if num_classes is None:
            raise ConfigError("model.num_classes is not set and no annotation file was found to "
                             "derive it from (set data.val.annotations or model.num_classes)")
        if class_names and len(class_names) != num_classes:
            raise ConfigError(f"model.num_classes is {num_classes} but the dataset has "
                             f"{len(class_names)} categories")
        if label_to_cat_id is None and cfg.data.label_map == "category_id":
            label_to_cat_id = {i: i for i in range(num_classes)}  # no json to tell which are "N/A"
        weights = weights or cfg.model.weights
        model = build_model(cfg.model, num_classes, load_backbone_weights=weights is None)
        if weights is not None:
            load_model_weights(model, weights)
        device = device or ("cuda" if cfg.train.device == "auto" and torch.cuda.is_available()
                            else "cpu" if cfg.train.device == "auto" else cfg.train.device)
        model.eval()
        if cfg.model.fold_batchnorm:  # this model is only ever used for inference
            model = fold_batchnorm(model)
        return cls(model.to(device), transform=build_transform(cfg.data, train=False),
                   postprocessor=build_postprocessor(cfg),
                   size_divisibility=cfg.data.size_divisibility, class_names=class_names,
                   label_to_cat_id=label_to_cat_id, device=device, channels_last=cfg.model.channels_last,
                   compile=cfg.model.compile_inference, winograd=cfg.model.winograd)

    @torch.no_grad()
    def run_batch(self, batch: Batch) -> tuple[RetinaNetOutput, list[dict[str, Tensor]]]:
        """A collated Batch -> (the network's raw outputs, per image {"boxes" (N, 4) xyxy in
        original pixels, "scores", "labels"}) of one forward pass in eval mode."""
        was_training = self.model.training
        self.model.eval()
        try:
            images = batch.images.to(self.device)
            out = self._compiled(images) if self._compiled is not None else None
            if out is None:
                out = self.model(images)
            return out, self.postprocessor(out.cls_logits, out.box_deltas, out.anchors,
                                           out.num_anchors_per_level, batch.image_sizes, batch.orig_sizes)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def predict_batch(self, batch: Batch) -> list[dict[str, Tensor]]:
        """run_batch's detections (the callable an Evaluator takes)."""
        return self.run_batch(batch)[1]

    def predict(self, images: Sequence[np.ndarray | Tensor]) -> list[dict[str, Tensor]]:
        """images: RGB uint8 (H, W, 3) numpy arrays, or float (3, H, W) tensors in [0, 1] (the input
        of torchvision's detection models). Returns per image {"boxes" (N, 4) xyxy in that image's
        pixels, "scores" (N,), "labels" (N,) in 0..K-1, "category_ids" (N,)}, on the CPU."""
        # Images go to the model's device before preprocessing (as uint8 when they are arrays:
        # a quarter of the bytes), so that on a GPU normalising, resizing and padding run there,
        # as torchvision's GeneralizedRCNNTransform does, instead of on the host.
        samples = [self.transform({"image": self._to_device(_check_image(img, i)), "image_id": i,
                                   "orig_size": _hw(img)})
                   for i, img in enumerate(images)]
        if not samples:
            return []
        outputs = self.predict_batch(self.collate(samples))
        return [{"boxes": o["boxes"].cpu(), "scores": o["scores"].cpu(), "labels": o["labels"].cpu(),
                 "category_ids": self._cat_id_lookup[o["labels"].cpu()]} for o in outputs]

    def _to_device(self, image: np.ndarray | Tensor) -> Tensor:
        """A checked image -> float (3, H, W) in [0, 1] on self.device."""
        if isinstance(image, Tensor):
            return image.detach().to(self.device)
        return rgb_to_tensor(image, self.device)


def _hw(image: np.ndarray | Tensor) -> tuple[int, int]:
    return (int(image.shape[1]), int(image.shape[2])) if isinstance(image, Tensor) else \
        (int(image.shape[0]), int(image.shape[1]))


def _check_image(image: np.ndarray | Tensor, index: int) -> np.ndarray | Tensor:
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise DataError(f"image {index}: tensors must be float (3, H, W) in [0, 1], got "
                             f"{image.dtype} {tuple(image.shape)}")
        return image
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"image {index}: arrays must be RGB uint8 (H, W, 3), got "
                         f"{getattr(image, 'dtype', type(image))} {getattr(image, 'shape', '')}")
    return image


def _categories(cfg: Config) -> tuple[list[str] | None, dict[int, int] | None]:
    for split in (cfg.data.val, cfg.data.train):
        if split.annotations and Path(split.annotations).is_file():
            label_to_cat_id, names = label_mapping(load_coco(split.annotations), cfg.data.label_map)
            return names, label_to_cat_id
    return None, None
