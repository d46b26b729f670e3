"""Precision-recall curve plots from COCOeval's accumulated precision (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state, works headless

# COCOeval's IoU thresholds are 0.50:0.05:0.95; the curves drawn are at these indices.
IOU_CURVES = {50: 0, 75: 5}


def save_pr_curves(precision: np.ndarray, class_names: Sequence[str], out_dir: str | Path) -> list[Path]:
    """precision (T=10 IoUs, R=101 recall points, K classes), -1 where undefined (a class without
    ground truth) -> out_dir/pr_curve_iou50.png and pr_curve_iou75.png: one thin line per class and
    the class mean in black, each labelled with its AP (the area under COCO's interpolated curve)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recall = np.linspace(0.0, 1.0, precision.shape[1])
    paths = []
    for iou, index in IOU_CURVES.items():
        curves = precision[index]  # (R, K)
        fig = Figure(figsize=(6.4, 4.8))
        ax = fig.subplots()
        defined = (curves > -1).all(axis=0)
        for k, name in enumerate(class_names):
            if defined[k]:
                ax.plot(recall, curves[:, k], lw=1, alpha=0.7, label=f"{name} ({100 * curves[:, k].mean():.1f})")
        if defined.any():
            mean = curves[:, defined].mean(axis=1)
            ax.plot(recall, mean, color="black", lw=2.5, label=f"mean ({100 * mean.mean():.1f})")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
               title=f"Precision-recall at IoU 0.{iou} (AP{iou} per class)")
        ax.grid(alpha=0.3)
        if defined.sum() <= 20:  # a legend of 80 COCO classes would hide the plot
            ax.legend(loc="lower left", fontsize=7)
        path = out_dir / f"pr_curve_iou{iou}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        paths.append(path)
    return paths
