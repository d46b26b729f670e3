"""The user-facing inference API.

    from retinanet import Detector
    detector = Detector.from_checkpoint("runs/shapes_R18/model_final.pth")  # all from the file
    detector = Detector.from_config("configs/shapes_R18.yaml", weights="runs/shapes_R18/model_final.pth")
    detections = detector.predict([rgb_uint8_image])   # [{"boxes", "scores", "labels", "category_ids"}]
    detections = detector.predict([large_image], slice=(512, 512))  # tiles at native size + whole
    detector.tta = TestTimeAugmentation(scales=(1.0, 1.5))  # flipped and rescaled views too (eval.tta)

What the labels mean (a class name and a dataset category id per label) comes from the weights
file when it is a trainer checkpoint, which carries them with its config: the checkpoint is the
truth about what its model predicts. Only a bare state dict (converted torchvision weights, a
weights name) takes them from the config's dataset, in any of its formats.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from .compiling import CompiledOrNone
from .config import Config, config_from_yaml, load_config
from .data import Batch, Collate, build_transform, label_mapping, load_coco, read_dataset
from .data.transforms import EvalTransform, rgb_to_tensor
from .errors import CheckpointError, ConfigError, DataError
from .model import RetinaNet, RetinaNetOutput, build_model, use_fast_memory_format
from .model.fold import fold_batchnorm
from .model.winograd import use_winograd
from .predictor import PostProcessor, build_postprocessor
from .slicing import Slicing, as_slicing, merge_tiles, tile_image
from .tta import TestTimeAugmentation, predict_with_tta
from .weights import is_path, load_checkpoint, load_model_weights


class Categories(NamedTuple):
    """What a model's labels mean, and the file that says so."""
    names: list[str]  # one per label 0..K-1
    label_to_cat_id: dict[int, int] | None  # labels without a dataset category left out; None: unknown
    source: str


class Detector:
    """A RetinaNet with its test-time preprocessing and postprocessing, on one device."""

    def __init__(self, model: RetinaNet, *, transform: Callable[[dict], dict], postprocessor: PostProcessor,
                 size_divisibility: int, class_names: Sequence[str] | None = None,
                 label_to_cat_id: dict[int, int] | None = None, device: str | torch.device = "cpu",
                 channels_last: bool | None = None, compile: bool = False, winograd: bool = False,
                 config: Config | None = None, tta: TestTimeAugmentation | None = None):
        self.device = torch.device(device)
        self.config = config  # what from_config / from_checkpoint built it from
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
        self.tta = tta  # predict_batch (so predict and evaluation) runs every view and merges them
        self._tile_transforms: dict[tuple[int, int], EvalTransform] = {}  # per tile size
        self.collate = Collate(size_divisibility)
        num_classes = model.num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.label_to_cat_id = label_to_cat_id or {i: i + 1 for i in range(num_classes)}
        # label -> category id, -1 for labels that are no category (torchvision's "N/A" outputs)
        self._cat_id_lookup = torch.tensor([self.label_to_cat_id.get(i, -1) for i in range(num_classes)])

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: Sequence[str] = (),
                        device: str | None = None) -> "Detector":
        """Everything from a trainer checkpoint alone: the model of the config it carries (with
        dotted `overrides`), its weights, class names and category ids. The device: `device`, else
        train.device as overridden, else the GPU when there is one (the checkpoint's own
        train.device is the training machine's). A file without a config (a bare state dict) is
        a ConfigError: pass a config to from_config."""
        if not is_path(path):
            raise ConfigError(f"{path} is no checkpoint file; weights by name need the config of "
                              "their model (--config configs/torchvision/..., or Detector.from_config)")
        checkpoint = load_checkpoint(path)
        config = checkpoint_config(checkpoint, path, overrides)
        categories = _checkpoint_categories(checkpoint, path) or _dataset_categories(config)
        return cls._build(config, categories, path, checkpoint, device)

    @classmethod
    def from_config(cls, config: str | Path | Config, weights: str | Path | None = None,
                    overrides: Sequence[str] = (), device: str | None = None) -> "Detector":
        """Builds the model of `config` (a path or a Config) and loads `weights` (a trainer
        checkpoint, a bare state dict or torchvision weights by name; default: the config's
        model.weights). Class names and category ids: the checkpoint's when it carries them (a
        ConfigError when the config's annotations name other classes), else those of the config's
        validation (else training) dataset when it exists."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        weights = weights or cfg.model.weights
        checkpoint = load_checkpoint(weights) if weights is not None and is_path(weights) else None
        categories = _checkpoint_categories(checkpoint, weights)
        dataset = _dataset_categories(cfg)
        if categories and dataset:
            check_same_classes(categories.names, categories.source, dataset.names, dataset.source)
        return cls._build(cfg, categories or dataset, weights, checkpoint, device)

    @classmethod
    def _build(cls, cfg: Config, categories: Categories | None, weights: str | Path | None,
               checkpoint: Mapping | None, device: str | None) -> "Detector":
        """The Detector of `cfg` with `weights` (already read into `checkpoint` when a file)."""
        names = categories.names if categories else None
        num_classes = cfg.model.num_classes or (len(names) if names else None)
        if num_classes is None:
            raise ConfigError("model.num_classes is not set and no annotation file was found to "
                              "derive it from (set data.val.annotations or model.num_classes)")
        if names and len(names) != num_classes:
            raise ConfigError(f"model.num_classes is {num_classes} but {categories.source} names "
                              f"{len(names)} classes")
        label_to_cat_id = categories.label_to_cat_id if categories else None
        if label_to_cat_id is None and cfg.data.label_map == "category_id":
            label_to_cat_id = {i: i for i in range(num_classes)}  # no json to tell which are "N/A"
        model = build_model(cfg.model, num_classes, load_backbone_weights=weights is None)
        if weights is not None:  # a file is read once: the metadata above came from it
            load_model_weights(model, weights, loaded=checkpoint)
        device = device or ("cuda" if cfg.train.device == "auto" and torch.cuda.is_available()
                            else "cpu" if cfg.train.device == "auto" else cfg.train.device)
        model.eval()
        if cfg.model.fold_batchnorm:  # this model is only ever used for inference
            model = fold_batchnorm(model)
        return cls(model.to(device), transform=build_transform(cfg.data, train=False),
                   postprocessor=build_postprocessor(cfg),
                   size_divisibility=cfg.data.size_divisibility, class_names=names,
                   label_to_cat_id=label_to_cat_id, device=device, channels_last=cfg.model.channels_last,
                   compile=cfg.model.compile_inference, winograd=cfg.model.winograd, config=cfg,
                   tta=TestTimeAugmentation(tuple(cfg.eval.tta.scales), cfg.eval.tta.hflip,
                                            cfg.eval.tta.merge, cfg.eval.tta.wbf_iou)
                   if cfg.eval.tta.enabled else None)

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
        """run_batch's detections (the callable an Evaluator takes); with `tta`, those of every
        view merged per image (see retinanet/tta.py)."""
        if self.tta is None:
            return self.run_batch(batch)[1]
        return predict_with_tta(lambda view: self.run_batch(view)[1], batch, self.tta,
                                size_divisibility=self.collate.size_divisibility,
                                nms_thresh=self.postprocessor.nms_thresh,
                                max_detections=self.postprocessor.max_detections,
                                class_agnostic=self.postprocessor.class_agnostic)

    def predict(self, images: Sequence[np.ndarray | Tensor],
                slice: Slicing | Sequence[float] | None = None) -> list[dict[str, Tensor]]:
        """images: RGB uint8 (H, W, 3) numpy arrays, or float (3, H, W) tensors in [0, 1] (the input
        of torchvision's detection models). Returns per image {"boxes" (N, 4) xyxy in that image's
        pixels, "scores" (N,), "labels" (N,) in 0..K-1, "category_ids" (N,)}, on the CPU.

        slice: a `retinanet.slicing.Slicing`, or (height, width[, overlap]): also run the network
        on overlapping tiles of each image at their native resolution (no resize to
        data.test_min_size) and merge them with the whole image's detections by per-class NMS
        (see retinanet/slicing.py). For large images with small objects."""
        checked = [_check_image(img, i) for i, img in enumerate(images)]
        if slice is None:
            outputs = self._predict_resized(checked)
        else:
            outputs = self._predict_sliced(checked, as_slicing(slice))
        return [{"boxes": o["boxes"].cpu(), "scores": o["scores"].cpu(), "labels": o["labels"].cpu(),
                 "category_ids": self._cat_id_lookup[o["labels"].cpu()]} for o in outputs]

    def preprocess(self, images: Sequence[np.ndarray | Tensor]) -> Batch:
        """Images as `predict` takes them -> the Batch its model sees: normalised, resized by the
        evaluation transform and padded (images (B, 3, H, W) on the device)."""
        # Images go to the model's device before preprocessing (as uint8 when they are arrays:
        # a quarter of the bytes), so that on a GPU normalising, resizing and padding run there,
        # as torchvision's GeneralizedRCNNTransform does, instead of on the host.
        images = [_check_image(img, i) for i, img in enumerate(images)]
        return self.collate([self.transform({"image": self._to_device(img), "image_id": i, "orig_size": _hw(img)})
                             for i, img in enumerate(images)])

    def _predict_resized(self, images: Sequence[np.ndarray | Tensor]) -> list[dict[str, Tensor]]:
        """Checked images, each resized by the evaluation transform -> detections on the device."""
        return self.predict_batch(self.preprocess(images)) if images else []

    def _predict_sliced(self, images: Sequence[np.ndarray | Tensor],
                        slicing: Slicing) -> list[dict[str, Tensor]]:
        """Checked images -> the merged detections of their tiles (and whole images), on the device."""
        wholes = self._predict_resized(images) if slicing.whole_image else [None] * len(images)
        merged = []
        for image, whole in zip(images, wholes):
            pixels = self._to_device(image)  # (3, H, W), cropped below without copying
            tiling = tile_image(pixels.shape[1], pixels.shape[2], slicing)
            windows = tiling.windows()
            tile_detections = []
            for start in range(0, len(windows), slicing.batch_size):
                samples = [self._tile_transform(y1 - y0, x1 - x0)(
                    {"image": pixels[:, y0:y1, x0:x1], "image_id": k, "orig_size": (y1 - y0, x1 - x0)})
                    for k, (x0, y0, x1, y1) in enumerate(windows[start:start + slicing.batch_size])]
                tile_detections += self.predict_batch(self.collate(samples))
            merged.append(merge_tiles(tile_detections, tiling, whole, nms_thresh=self.postprocessor.nms_thresh,
                                      max_detections=self.postprocessor.max_detections,
                                      class_agnostic=self.postprocessor.class_agnostic))
        return merged

    def _tile_transform(self, height: int, width: int) -> EvalTransform:
        """The evaluation transform's normalisation at scale 1 for a height x width tile: its
        min_size and max_size are the tile's sides, so resize_scale is exactly 1 (no resize)."""
        key = (height, width)
        if key not in self._tile_transforms:
            mean, std = getattr(self.transform, "mean", None), getattr(self.transform, "std", None)
            if mean is None or std is None:
                raise ConfigError("sliced inference needs the evaluation transform's mean and std "
                                  "(Detector(transform=EvalTransform(...)))")
            self._tile_transforms[key] = EvalTransform(
                min_size=min(key), max_size=max(key), mean=torch.as_tensor(mean).flatten().tolist(),
                std=torch.as_tensor(std).flatten().tolist())
        return self._tile_transforms[key]

    def _to_device(self, image: np.ndarray | Tensor) -> Tensor:
        """A checked image -> float (3, H, W) in [0, 1] on self.device."""
        if isinstance(image, Tensor):
            return image.detach().to(self.device)
        return rgb_to_tensor(image, self.device)


def load_detector(weights: str | Path, config: str | Path | None = None, overrides: Sequence[str] = (),
                  device: str | None = None) -> Detector:
    """The tools' rule for --weights with an optional --config: from_config with a config,
    from_checkpoint without."""
    if config is None:
        return Detector.from_checkpoint(weights, overrides, device)
    return Detector.from_config(config, weights=weights, overrides=overrides, device=device)


def checkpoint_config(checkpoint: Mapping, source: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a trainer checkpoint carries (YAML text), with dotted `overrides`; train.device
    reset to auto first, the training machine's device being no guide to this one's."""
    text = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    if not isinstance(text, str):
        raise ConfigError(f"{source} carries no config (a bare state dict, e.g. converted torchvision "
                          "weights): pass the config of its model (--config configs/X.yaml, or "
                          "Detector.from_config(config, weights=...))")
    return config_from_yaml(text, f"{source} (its config)", overrides, defaults=["train.device=auto"])


def check_same_classes(model_names: Sequence[str], model_source: str | Path,
                       dataset_names: Sequence[str], dataset_source: str | Path) -> None:
    """ConfigError naming both files when a model's classes are not a dataset's, in label order."""
    model_names, dataset_names = list(model_names), list(dataset_names)
    if model_names == dataset_names:
        return
    first = next((i for i, (a, b) in enumerate(zip(model_names, dataset_names)) if a != b), None)
    detail = "" if first is None else \
        f" (label {first}: {model_names[first]!r} in the first, {dataset_names[first]!r} in the second)"
    raise ConfigError(f"{model_source} predicts {len(model_names)} classes, {dataset_source} has "
                      f"{len(dataset_names)}{detail}: use the config of the data it was trained on, "
                      "or no config (the checkpoint's own: Detector.from_checkpoint, the tools "
                      "without --config)")


def _checkpoint_categories(checkpoint: Mapping | None, source: str | Path) -> Categories | None:
    """The class names and category ids a trainer checkpoint carries; None when it has none."""
    names = checkpoint.get("class_names") if isinstance(checkpoint, Mapping) else None
    if names is None:
        return None
    ids = checkpoint.get("category_ids")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or \
            (ids is not None and (not isinstance(ids, list) or len(ids) != len(names))):
        raise CheckpointError(f"{source}: class_names and category_ids must be lists with a name "
                              "and an id per label")
    label_to_cat_id = None if ids is None else {i: int(c) for i, c in enumerate(ids) if int(c) >= 0}
    return Categories(names, label_to_cat_id, str(source))


def _dataset_categories(cfg: Config) -> Categories | None:
    """The classes of the config's validation (else training) dataset, in whatever format it
    is (coco, voc, yolo); None when neither annotation path exists."""
    for split in (cfg.data.val, cfg.data.train):
        if split.annotations and Path(split.annotations).exists():
            dataset, _ = read_dataset(split.images, split.annotations, split.format, cfg.data.classes)
            label_to_cat_id, names = label_mapping(load_coco(split.annotations, dataset), cfg.data.label_map)
            return Categories(names, label_to_cat_id, str(split.annotations))
    return None


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
