"""An evaluation's figures (matplotlib, no display): precision-recall curves, the confusion matrix
and per-class AP, saved as PNG and rendered to arrays for tensorboard."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure  # no pyplot: no backend, no global figure state, works headless

# COCOeval's IoU thresholds are 0.50:0.05:0.95; the curves drawn are at these indices.
IOU_CURVES = {50: 0, 75: 5}


def pr_curve_figures(precision: np.ndarray, class_names: Sequence[str]) -> dict[str, Figure]:
    """precision (T=10 IoUs, R=101 recall points, K classes), -1 where undefined (a class without
    ground truth) -> {"pr_curve_iou50": figure, "pr_curve_iou75": figure}: one thin line per class
    and the class mean in black, each labelled with its AP (the area under COCO's interpolated curve)."""
    recall = np.linspace(0.0, 1.0, precision.shape[1])
    figures = {}
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
        figures[f"pr_curve_iou{iou}"] = fig
    return figures


def confusion_figure(counts: np.ndarray, class_names: Sequence[str], score_thresh: float) -> Figure:
    """counts (K + 1, K + 1) of `confusion.confusion_matrix` -> a heat map of each true class's
    row normalised to its objects (the background row to its false positives), counts written in."""
    names = [*class_names, "background"]
    rows = counts.sum(axis=1, keepdims=True)
    share = counts / np.maximum(rows, 1)
    side = 2.5 + 0.45 * len(names)
    fig = Figure(figsize=(side + 1, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the row")
    if len(names) <= 30:  # numbers in 80 x 80 cells would be unreadable
        for (i, j), value in np.ndenumerate(counts):
            if value:
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="detected as", ylabel="true class",
           title=f"Confusion at IoU 0.5, score >= {score_thresh:g}")
    return fig


def per_class_ap_figure(per_class: Mapping[str, float]) -> Figure:
    """{class name: AP} (nan for a class without ground truth) -> a bar chart, best first."""
    items = sorted(((name, ap) for name, ap in per_class.items() if ap == ap), key=lambda item: -item[1])
    fig = Figure(figsize=(max(4.0, 1.0 + 0.3 * len(items)), 4.0))
    ax = fig.subplots()
    ax.bar(range(len(items)), [100 * ap for _, ap in items], color="tab:blue")
    ax.set_xticks(range(len(items)), [name for name, _ in items], rotation=90, fontsize=7)
    ax.set(ylim=(0, 100), ylabel="AP (IoU 0.50:0.95)", title="AP per class")
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_figures(figures: Mapping[str, Figure], out_dir: str | Path) -> list[Path]:
    """Each figure as out_dir/<name>.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        paths.append(out_dir / f"{name}.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    return paths


def figure_array(fig: Figure) -> np.ndarray:
    """The figure rendered to (H, W, 3) uint8, as tensorboard's add_image takes it."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
