"""Evaluation on the validation set: COCO AP (each rank scores its shard), the training loss on
the same images, and detections drawn over a few of them."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import CocoDetection, build_test_loader, build_transform
from ..detector import Detector
from ..losses.focal import upcast
from ..predictor import build_postprocessor
from ..visualize import draw_detections
from .distributed import DistInfo, all_reduce_mean, broadcast_buffers
from .evaluator import Evaluator


def build_evaluator(config: Config, dataset: CocoDetection, *, output_dir: Path, progress: bool = False,
                    rank: int = 0, world_size: int = 1) -> Evaluator:
    """The COCO evaluation config.eval describes, over this rank's shard of `dataset`."""
    ev, data = config.eval, config.data
    loader = build_test_loader(dataset, batch_size=ev.batch_size, num_workers=data.num_workers,
                               size_divisibility=data.size_divisibility, rank=rank, world_size=world_size)
    return Evaluator(dataset, loader, output_dir=output_dir, max_dets=ev.max_dets, backend=ev.backend,
                     pr_curves=ev.pr_curves, confusion_score_thresh=ev.vis_score_thresh,
                     progress=progress)


def write_visualizations(dataset, predictions: dict, out_dir: Optional[Path], count: int,
                         score_thresh: float) -> list[tuple[int, np.ndarray]]:
    """Draws the first `count` images of `dataset` with their detections above `score_thresh`
    and their ground truth; writes them to out_dir/<image id>.png when out_dir is given.
    Returns [(image_id, (H, W, 3) uint8 drawing)]."""
    drawn = []
    for image_id in dataset.image_ids[:count]:
        det = predictions.get(image_id)
        if det is None:
            continue
        keep = det["scores"] >= score_thresh
        gt_boxes, _ = dataset.targets(image_id)
        image = draw_detections(dataset.read_image(image_id), det["boxes"][keep].numpy(),
                                det["labels"][keep].tolist(), det["scores"][keep].tolist(),
                                dataset.class_names, gt_boxes=gt_boxes)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            image.save(Path(out_dir) / f"{image_id}.png")
        drawn.append((image_id, np.asarray(image)))
    return drawn


class Validation:
    """`validation(visualize=..., progress=...) -> (result, drawn)`: the Evaluator's result for
    the model being trained (plus "val_loss" {"loss", "loss_cls", "loss_box"} with eval.val_loss)
    and, on rank 0, eval.num_vis_images drawings (also written to output_dir/vis when `visualize`).
    Scores go to output_dir/eval."""

    def __init__(self, config: Config, *, dataset: CocoDetection, model: nn.Module, criterion: nn.Module,
                 device: torch.device, dist: DistInfo, output_dir: Path, log: Callable[[str], None]):
        self.config, self.dataset, self.model, self.criterion = config, dataset, model, criterion
        self.device, self.dist, self.output_dir, self.log = device, dist, Path(output_dir), log
        self.detector = Detector(model, transform=build_transform(config.data, train=False),
                                 postprocessor=build_postprocessor(config),
                                 size_divisibility=config.data.size_divisibility,
                                 class_names=dataset.class_names, label_to_cat_id=dataset.label_to_cat_id,
                                 device=device, channels_last=config.model.channels_last)

    def predict(self, batch, on_outputs: Optional[Callable] = None) -> list[dict[str, torch.Tensor]]:
        """The one call into inference: a collated Batch -> per image {"boxes" (N, 4) xyxy in
        original pixels, "scores", "labels"}; `on_outputs(outputs, batch)` sees the raw outputs
        of the same forward pass."""
        out, detections = self.detector.run_batch(batch)
        if on_outputs is not None:
            on_outputs(out, batch)
        return detections

    def estimate_seconds(self, batches: int = 2) -> float:
        """Seconds an evaluation will take on this rank: the first `batches` of its shard
        predicted and timed (workers starting included), scaled to the shard, plus a fifth for
        the scoring and drawing that follow (train.time_budget_s)."""
        loader = build_evaluator(self.config, self.dataset, output_dir=self.output_dir / "eval",
                                 rank=self.dist.rank, world_size=self.dist.world_size).loader
        start, timed = time.perf_counter(), 0
        for batch in loader:
            self.predict(batch)
            timed += 1
            if timed == batches:
                break
        return (time.perf_counter() - start) * len(loader) / max(timed, 1) * 1.2

    def __call__(self, *, visualize: bool = False, progress: bool = False) -> tuple[dict, list]:
        ev = self.config.eval
        broadcast_buffers(self.model)  # every rank evaluates rank 0's BatchNorm statistics
        evaluator = build_evaluator(self.config, self.dataset, output_dir=self.output_dir / "eval",
                                    progress=progress, rank=self.dist.rank, world_size=self.dist.world_size)
        sums: dict[str, torch.Tensor] = {}

        def add_val_loss(out, batch) -> None:
            # The training loss on validation images (eval mode: BatchNorm uses its statistics).
            losses = self.criterion(upcast(out.cls_logits), upcast(out.box_deltas), out.anchors,
                                    [b.to(self.device) for b in batch.boxes],
                                    [lab.to(self.device) for lab in batch.labels])
            for key in ("loss_cls", "loss_box"):
                sums[key] = sums.get(key, 0) + losses[key].detach() * len(batch.image_ids)
            sums["images"] = sums.get("images", 0) + len(batch.image_ids)

        self.criterion.eval()  # per-rank normaliser: ranks run different numbers of validation batches
        try:
            result = evaluator(lambda batch: self.predict(batch, add_val_loss if ev.val_loss else None),
                               log=self.log)
        finally:
            self.criterion.train()
        if ev.val_loss:
            totals = torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float32,
                                                  device=self.device).reshape(())
                                  for k in ("loss_cls", "loss_box", "images")])
            totals = all_reduce_mean(totals)  # sums over ranks / world: the ratio is unchanged
            loss_cls, loss_box = (totals[:2] / totals[2].clamp(min=1)).tolist()
            result["val_loss"] = {"loss_cls": loss_cls, "loss_box": loss_box, "loss": loss_cls + loss_box}
        drawn = []
        if self.dist.is_main:
            drawn = write_visualizations(self.dataset, result["predictions"],
                                         self.output_dir / "vis" if visualize else None,
                                         ev.num_vis_images, ev.vis_score_thresh)
        return result, drawn
