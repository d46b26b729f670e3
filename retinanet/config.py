"""Typed configuration: a schema of dataclasses, YAML files with `_base_` inheritance, and
`dotted.key=value` overrides from the command line.

Every key a user can write is a field below; an unknown key or a value of the wrong type is a
one-line `ConfigError` naming the key (and the closest valid key), raised before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from .errors import ConfigError  # noqa: F401  (re-exported: `from retinanet.config import ConfigError`)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    depth: Literal[18, 34, 50, 101] = 50  # ResNet depth (torchvision's implementation)
    # frozen_bn: BatchNorm with fixed statistics and affine (for pretrained weights);
    # bn: ordinary trainable BatchNorm (training from scratch); gn: GroupNorm(32).
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    norm_eps: float = 1e-5  # epsilon of the backbone's normalisation (torchvision's v1 COCO weights: 0)
    # Stages frozen from the input side: 0 = none, 1 = stem, 2 = stem + res2, ... 5 = all.
    freeze_at: int = 2
    # torchvision ImageNet ResNet weights: a path (an existing file or a name ending in .pth / .pt),
    # or a torchvision name (ResNet50_Weights.IMAGENET1K_V1, or IMAGENET1K_V1 for this depth: a name
    # for another depth is an error) downloaded once into $TORCH_HOME/hub/checkpoints; None = random.
    weights: Optional[str] = None


@dataclass
class FPNConfig:
    channels: int = 256  # width of P3-P7 and of the heads
    # Where P6 is computed from: "c5" (the RetinaNet paper, detectron2) or "p5" (torchvision v1).
    p6_from: Literal["c5", "p5"] = "c5"


@dataclass
class HeadConfig:
    num_convs: int = 4  # 3x3 conv + ReLU layers in each subnet before its output conv
    norm: Literal["none", "gn"] = "none"  # normalisation in the subnets (gn: GroupNorm, as torchvision v2)
    gn_groups: int = 32  # GroupNorm groups when norm is gn
    prior_prob: float = 0.01  # initial foreground probability of every anchor (classifier bias)


@dataclass
class AnchorConfig:
    # One base size per pyramid level (P3..P7), multiplied by each octave scale.
    sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    # Multipliers of each level's size.
    octave_scales: list[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    # Strides of P3..P7 (fixed by the network).
    strides: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])
    # Anchor centres sit at (i + offset) * stride.
    offset: float = 0.0
    # Round base anchors to integer coordinates (torchvision does).
    round_base: bool = False
    # Explicit anchor sizes per level, replacing sizes x octave_scales: torchvision truncates the
    # octave sizes to integers, [[32, 40, 50], [64, 80, 101], ...]. None: sizes x octave_scales.
    level_sizes: Optional[list[list[float]]] = None
    # torchvision computes each level's stride as padded image size // grid size (per axis), which
    # differs from 8..128 when the padding is not a multiple of 128 (e.g. stride 61 for P6 of an
    # 800-px input). Only for reproducing torchvision-trained weights exactly.
    torchvision_strides: bool = False


@dataclass
class MatcherConfig:
    fg_iou: float = 0.5  # IoU at or above which an anchor is positive
    bg_iou: float = 0.4  # IoU below which an anchor is background; in between: ignored
    allow_low_quality: bool = True  # also make each box's best anchors positive


@dataclass
class BoxCoderConfig:
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # divisors of (dx, dy, dw, dh)
    # Upper bound of dw, dh before exp(): log(1000 / 16), as in torchvision and detectron2.
    clamp: float = math.log(1000.0 / 16)


@dataclass
class PostprocessConfig:
    score_thresh: float = 0.05  # detections below are dropped (0.05: the COCO evaluation setting)
    topk_candidates: int = 1000  # per level and image, after the score threshold
    nms_thresh: float = 0.5  # IoU of per-class NMS
    max_detections: int = 100  # per image
    # NMS across classes: one box per object, with its best class (ultralytics' agnostic_nms). Off
    # (COCO's setting), a box keeps a lower-scored second class, which raises recall and mAP.
    class_agnostic: bool = False


@dataclass
class ModelConfig:
    # None: taken from the training set's categories.
    num_classes: Optional[int] = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn: FPNConfig = field(default_factory=FPNConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    box_coder: BoxCoderConfig = field(default_factory=BoxCoderConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # Memory layout: None = channels_last on CPU (faster there), contiguous on CUDA; false =
    # contiguous everywhere, torchvision's layout (needed for bit-identical torchvision outputs).
    channels_last: Optional[bool] = None
    # Frozen BatchNorm folded into the convolution before it: in training the conv scales its
    # weights at each call (same gradients, same checkpoint keys), and inference (Detector,
    # tools/eval.py, infer, export) folds every frozen / eval-mode norm once. Two passes over
    # the activations less per norm (figures: docs/benchmarks.md); false keeps torchvision's
    # exact rounding (its configs set false).
    fold_batchnorm: bool = True
    # torch.compile (inductor, weights frozen into the graph) of a standalone inference model
    # (Detector.from_config: tools/eval.py, tools/infer.py, the Python API; not evaluation during
    # training, whose weights change). Pays a compilation per new input shape (figures:
    # docs/benchmarks.md); eager with a warning where it cannot compile.
    compile_inference: bool = False
    # With compile_inference on CPU: the 3x3 stride-1 convolutions (head, FPN outputs, ResNet
    # blocks) by Winograd F(2x2, 3x3), 2.25x fewer multiply-adds than oneDNN's direct
    # convolution; results equal to float32 rounding. Faster where inductor fuses the transforms,
    # at the price of minutes of compilation per new input shape and more peak memory
    # (docs/benchmarks.md): for a fixed input size, not for evaluation at many. No effect
    # eagerly or on CUDA (cuDNN picks its own algorithms).
    winograd: bool = False
    # Initial weights of the whole model for fine-tuning: a checkpoint path (ours, or one converted
    # by tools/convert_torchvision.py), or torchvision's RetinaNet_ResNet50_FPN_Weights.COCO_V1 /
    # RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1 (downloaded, converted in memory; they need the
    # configs/torchvision/* architecture). Every tensor must fit, except the classifier: it keeps its
    # fresh initialisation when the class count differs, and the log says so.
    weights: Optional[str] = None


@dataclass
class ClsLossConfig:
    # focal | bce (focal with gamma 0) | ghm (GHM-C) | ohem (hard negatives on BCE) |
    # softmax_focal (K + 1 classes; scores become softmax probabilities). When to use each:
    # the docstrings in retinanet/losses/classification.py.
    type: Literal["focal", "bce", "ghm", "ohem", "softmax_focal"] = "focal"
    alpha: Optional[float] = 0.25  # focal, bce, softmax_focal; None: no positive/negative balancing
    gamma: float = 2.0  # focal, softmax_focal
    label_smoothing: float = 0.0  # focal, bce (towards 0.5), softmax_focal (towards 1/(K+1))
    # focal, bce: auto (Triton on CUDA when it imports; on CPU compile from 4M logits up, else
    # eager) | eager (torch ops over cache-sized chunks) | compile (torch.compile of the same
    # math, one fused loop, compiled once per process; falls back to eager with a warning where
    # it cannot compile) | triton
    kernel: Literal["auto", "eager", "compile", "triton"] = "auto"
    ghm_bins: int = 30  # the GHM paper's setting (with momentum 0.75)
    ghm_momentum: float = 0.75  # EMA of the gradient-density histogram
    ohem_neg_pos_ratio: float = 3.0  # hard negatives kept per positive, per image
    ohem_min_negatives: int = 16  # per image, so images without boxes still teach background
    # Class-balanced weighting by effective number (Cui et al. 2019), on top of any type:
    # positives of class k are weighted by (1 - beta) / (1 - beta^n_k); None disables it.
    class_balance_beta: Optional[float] = None
    weight: float = 1.0  # multiplier of the classification loss


@dataclass
class BoxLossConfig:
    type: Literal["smooth_l1", "l1", "giou"] = "smooth_l1"  # box regression loss
    beta: float = 0.1  # smooth-L1 transition point; 0 means plain L1
    weight: float = 1.0  # multiplier of the box loss


@dataclass
class LossConfig:
    cls: ClsLossConfig = field(default_factory=ClsLossConfig)
    box: BoxLossConfig = field(default_factory=BoxLossConfig)
    # Losses are divided by the number of positive anchors in the batch; with momentum m > 0 by an
    # EMA of it instead (m * ema + (1 - m) * num_fg), which is steadier at small batch sizes.
    normalizer_momentum: float = 0.0


@dataclass
class DatasetConfig:
    # Image folder. coco: the folder the json's file_name values are relative to; voc:
    # `JPEGImages` (or the folder holding images and XML files side by side); yolo:
    # `images/<split>` (subfolders too).
    images: str = ""
    # coco: the instances json. voc: the `Annotations` folder (every XML file), the VOC root
    # holding it, `ImageSets/Main/<split>.txt` (the ids listed) or a folder of XML files beside
    # the images. yolo: the `data.yaml` (labels where ultralytics looks: the images path with its
    # last `images` folder replaced by `labels`) or the labels folder (class names from
    # data.classes or a `data.yaml` one or two folders above it). Layouts: docs/your-data.md.
    annotations: str = ""
    # auto: from what `annotations` names: a `.json` is coco; a `.yaml`, or a folder of `.txt`
    # labels (or one named `labels`), is yolo; a folder with `.xml` files or an `Annotations`
    # folder, or an `ImageSets/Main` list, is voc.
    format: Literal["auto", "coco", "voc", "yolo"] = "auto"


@dataclass
class ColorJitterConfig:
    prob: float = 0.0  # 0 disables it
    brightness: float = 0.2  # max relative change
    contrast: float = 0.2  # max relative change
    saturation: float = 0.2  # max relative change
    hue: float = 0.02  # max hue shift (fraction of the colour circle)


@dataclass
class DataConfig:
    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig = field(default_factory=DatasetConfig)
    # Training resizes the shortest side to one of min_size (drawn per image: multi-scale when
    # several) with the longest side at most max_size; evaluation uses test_min_size.
    min_size: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333  # longest side bound in training
    test_min_size: int = 800  # shortest side at evaluation and inference
    test_max_size: int = 1333  # longest side bound at evaluation and inference
    hflip_prob: float = 0.5  # horizontal flip probability in training
    color_jitter: ColorJitterConfig = field(default_factory=ColorJitterConfig)
    # Mean and std of [0, 1] RGB input.
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # of [0, 1] RGB input
    # Batches are padded to a multiple of this (128 keeps the P7 grid aligned with its stride).
    size_divisibility: int = 128
    # Batches of landscape-only or portrait-only images (less padding; detectron2's and
    # torchvision's aspect-ratio grouping with two groups). The data order then depends on it.
    aspect_ratio_grouping: bool = False
    # An image file that cannot be read is an error naming it; true: it is skipped and counted
    # (missing files are left out when training starts, unreadable ones replaced when met).
    skip_bad_images: bool = False
    # How labels relate to the json's category ids. contiguous: label k is the k-th category id
    # in sorted order (K outputs). category_id: label k is category id k (max id + 1 outputs, the
    # unused ones named "N/A"), the convention of torchvision's COCO models (91 outputs).
    label_map: Literal["contiguous", "category_id"] = "contiguous"
    num_workers: int = 2  # DataLoader worker processes (0: load in the main process)
    # Class names of voc and yolo datasets, in label order (category id i + 1 is the i-th). voc:
    # the set and order of classes (an object of another name is an error naming its file and
    # line); null: the names found in the XML files, sorted. yolo: the names when no data.yaml
    # is found (with one, they must equal its names). Not for coco: the json names its categories.
    classes: Optional[list[str]] = None


@dataclass
class OptimizerConfig:
    type: Literal["sgd", "adamw"] = "sgd"  # optimizer
    lr: float = 0.01  # base learning rate (for the total batch; see docs/multi-gpu.md's scaling rule)
    momentum: float = 0.9  # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW only
    weight_decay: float = 1e-4  # on conv and linear weights
    # Weight decay on norm layers and biases; 0 is the usual choice for AdamW.
    weight_decay_norm: float = 0.0


@dataclass
class SchedulerConfig:
    type: Literal["multistep", "cosine"] = "multistep"  # LR schedule after the warm-up
    steps: list[int] = field(default_factory=lambda: [60000, 80000])  # multistep only
    gamma: float = 0.1  # multistep only
    min_lr_factor: float = 0.0  # cosine only: final LR = lr * min_lr_factor
    warmup_iters: int = 1000  # linear warm-up length
    warmup_factor: float = 0.001  # LR at iteration 0 = lr * warmup_factor, then linear


@dataclass
class EmaConfig:
    # Evaluate and save an exponential moving average of the weights (the checkpoint's model;
    # the raw weights ride along for resume).
    enabled: bool = False
    decay: float = 0.9998  # per step, warmed up as min(decay, (1 + n) / (10 + n)) at step n


@dataclass
class TrainConfig:
    batch_size: int = 16  # images per step and per process (total = processes x batch_size)
    max_iter: int = 90000  # optimisation steps
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    clip_grad_norm: Optional[float] = None  # None: no clipping
    amp: bool = False  # mixed precision, CUDA only
    seed: int = 42  # model init, data order and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_period: int = 20  # iterations between log lines and tensorboard points
    checkpoint_period: int = 5000  # iterations between checkpoints (0: only model_final.pth)
    keep_checkpoints: int = 3  # periodic checkpoints kept (the newest); model_final.pth always stays
    eval_period: int = 0  # 0: evaluate only at the end
    # With eval_period: stop after this many evaluations in a row without a new best AP (0:
    # never); the best is kept as model_best.pth either way.
    patience: int = 0
    # Seconds for the whole run (training, periodic and final evaluations): the run's length (and
    # the schedule's steps, in proportion) is chosen from the speed measured over its first
    # iterations, replacing max_iter. 0: max_iter decides.
    time_budget_s: float = 0.0
    ema: EmaConfig = field(default_factory=EmaConfig)
    # A step whose loss or gradient is not finite is skipped (weights and BatchNorm statistics
    # untouched) and logged with the batch's image ids; this many in a row stop training.
    max_bad_steps: int = 5
    # torchrun only: SyncBatchNorm across processes for trainable BatchNorm (CUDA), and the
    # timeout of every collective, after which a job with a dead or stuck rank stops with an error.
    sync_bn: bool = False
    dist_timeout_s: float = 1800.0  # seconds
    # Deterministic algorithms (torch.use_deterministic_algorithms, no cuDNN autotuning): with
    # the same seed and thread count, runs and resumed runs give bit-identical weights.
    deterministic: bool = False


@dataclass
class TtaConfig:
    # tools/eval.py, tools/infer.py and Detector.predict also run each image mirrored and at the
    # other scales, merging the detections per class: weighted box fusion (wbf: boxes of a cluster
    # averaged by score, see retinanet/tta.py) or NMS at model.postprocess.nms_thresh. wbf is the
    # default because it measured better: demo models' mAP 0.766 -> 0.791 (nms 0.774) and
    # 0.663 -> 0.690 (nms 0.670), flip views (docs/inference.md).
    enabled: bool = False
    hflip: bool = True  # mirrored views
    scales: list[float] = field(default_factory=lambda: [1.0])  # factors of the evaluation size
    merge: Literal["nms", "wbf"] = "wbf"  # how the views' detections become one set per image
    wbf_iou: float = 0.55  # wbf: IoU with a cluster's fused box at which a detection joins it


@dataclass
class EvalConfig:
    batch_size: int = 8  # images per evaluation batch
    max_dets: int = 100  # COCOeval's maxDets for AP (AR also reports 1 and 10)
    num_vis_images: int = 4  # images drawn with detections and ground truth (files and tensorboard)
    # score from which drawn images show a detection and the confusion matrix counts one
    vis_score_thresh: float = 0.3
    # pycocotools, or faster_coco_eval (C++, same 12 numbers to 1e-4; pip install -e .[fast-eval])
    backend: Literal["pycocotools", "faster_coco_eval"] = "pycocotools"
    pr_curves: bool = True  # eval/pr_curve_iou50.png and _iou75.png, per_class_ap.png, confusion_matrix.png
    val_loss: bool = False  # also compute the training loss on the validation set (tensorboard)
    tta: TtaConfig = field(default_factory=TtaConfig)  # test-time augmentation


@dataclass
class Config:
    output_dir: str = "runs/default"  # run folder: config, checkpoints, tensorboard, eval
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads `path` (following `_base_`), applies `key.sub=value` overrides, checks the schema."""
    return _checked(_read_with_bases(Path(path), seen=()), str(path), overrides)


def _checked(data: dict, source: str, overrides: Sequence[str]) -> Config:
    """`data` with the dotted overrides applied, as a schema-checked Config."""
    for override in overrides:
        key, value = _parse_override(override)
        _set_dotted(data, key, value, source="command line")
    config = from_dict(data, source=source)
    validate(config)
    return config


def from_dict(data: dict, source: str = "<dict>") -> Config:
    return _build(Config, data, prefix="", source=source)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_to_yaml(config: Config) -> str:
    """The resolved config as YAML text (what a run folder's config.yaml and a checkpoint hold)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_from_yaml(text: str, source: str = "<yaml>", overrides: Sequence[str] = (),
                     defaults: Sequence[str] = ()) -> Config:
    """Inverse of config_to_yaml, checked against the schema like a config file, with dotted
    `defaults` and then `overrides` applied (so an override wins over a default)."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: config must be a mapping, got {type(data).__name__}")
    return _checked(data, source, [*defaults, *overrides])


def save_config(config: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_to_yaml(config))


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (leaves and sections)."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(all_keys(hint, key + "."))
    return keys


def validate(config: Config) -> None:
    """Value checks that types alone cannot express."""
    m, t = config.model, config.train

    def check(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {message}")

    check(m.num_classes is None or m.num_classes > 0, "model.num_classes", "must be positive")
    check(0 <= m.backbone.freeze_at <= 5, "model.backbone.freeze_at", "must be in 0..5")
    check(0 < m.matcher.bg_iou <= m.matcher.fg_iou <= 1, "model.matcher.bg_iou",
          f"need 0 < bg_iou <= fg_iou <= 1, got bg_iou={m.matcher.bg_iou}, fg_iou={m.matcher.fg_iou}")
    n_levels = len(m.anchors.strides)
    check(m.anchors.strides == [8, 16, 32, 64, 128], "model.anchors.strides",
          f"must be the strides of P3..P7, [8, 16, 32, 64, 128], got {m.anchors.strides}")
    check(len(m.anchors.sizes) == n_levels, "model.anchors.sizes",
          f"need one size per level ({n_levels}), got {len(m.anchors.sizes)}")
    level_sizes = m.anchors.level_sizes
    check(level_sizes is None or (len(level_sizes) == n_levels
                                  and len({len(s) for s in level_sizes}) == 1
                                  and all(v > 0 for s in level_sizes for v in s)),
          "model.anchors.level_sizes",
          f"need {n_levels} lists of the same number of positive sizes, got {level_sizes}")
    check(len(m.box_coder.weights) == 4, "model.box_coder.weights", "need 4 weights")
    check(t.optimizer.lr > 0, "train.optimizer.lr", f"must be positive, got {t.optimizer.lr}")
    check(t.batch_size > 0, "train.batch_size", "must be positive")
    check(t.max_iter > 0, "train.max_iter", "must be positive")
    check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    check(t.dist_timeout_s > 0, "train.dist_timeout_s", "must be positive")
    check(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    check(t.patience >= 0, "train.patience", "must be >= 0 (0: never stop early)")
    check(t.patience == 0 or t.eval_period > 0, "train.patience",
          "counts periodic evaluations: set train.eval_period too")
    check(t.time_budget_s >= 0, "train.time_budget_s", "must be >= 0 (0: train.max_iter decides)")
    check(0 < t.ema.decay < 1, "train.ema.decay", f"must be in (0, 1), got {t.ema.decay}")
    check(bool(config.eval.tta.scales) and all(0.1 <= f <= 4 for f in config.eval.tta.scales),
          "eval.tta.scales", f"need factors of the evaluation size in [0.1, 4], got {config.eval.tta.scales}")
    check(0.0 < config.eval.tta.wbf_iou < 1.0, "eval.tta.wbf_iou", "must be in (0, 1)")
    check(t.checkpoint_period >= 0, "train.checkpoint_period", "must be >= 0 (0: only the final one)")
    check(config.loss.box.beta >= 0, "loss.box.beta", "must be >= 0")
    cls = config.loss.cls
    check(0 <= cls.label_smoothing < 1, "loss.cls.label_smoothing", "must be in [0, 1)")
    check(cls.kernel == "auto" or cls.type in ("focal", "bce"), "loss.cls.kernel",
          f"selects the fused focal / bce kernel, not one for {cls.type}")
    check(cls.label_smoothing == 0 or cls.type in ("focal", "bce", "softmax_focal"),
          "loss.cls.label_smoothing", f"applies to focal, bce and softmax_focal, not {cls.type}")
    check(cls.ghm_bins >= 1, "loss.cls.ghm_bins", "must be >= 1")
    check(0 <= cls.ghm_momentum < 1, "loss.cls.ghm_momentum", "must be in [0, 1)")
    check(cls.ohem_neg_pos_ratio > 0, "loss.cls.ohem_neg_pos_ratio", "must be positive")
    check(cls.class_balance_beta is None or 0 <= cls.class_balance_beta < 1,
          "loss.cls.class_balance_beta", "must be in [0, 1) or null")
    check(all(s > 0 for s in config.data.min_size) and config.data.min_size, "data.min_size",
          "need one or more positive sizes")
    check(len(config.data.mean) == 3 and len(config.data.std) == 3, "data.mean",
          "mean and std need 3 values (RGB)")
    check(all(s > 0 for s in config.data.std), "data.std", "must be positive")
    classes = config.data.classes
    check(classes is None or (classes and all(classes) and len(set(classes)) == len(classes)),
          "data.classes", f"need distinct non-empty names (or null), got {classes}")


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(map(str, seen))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for base in bases:
        _deep_merge(merged, _read_with_bases(path.parent / base, seen + (path,)))
    _deep_merge(merged, data)
    return merged


def _deep_merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""  # "key=" is the empty string; use key=null for None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _suggest(key: str) -> str:
    keys = all_keys()
    # A key with the same last component in another section ("train.lr" -> "train.optimizer.lr")
    # is the likeliest intent; otherwise the closest spelling overall.
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    match = difflib.get_close_matches(key, same_leaf, n=1, cutoff=0.0) if same_leaf else \
        difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _build(cls: type, data: Any, prefix: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping, "
                          f"got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = prefix + str(key)
            raise ConfigError(f"{source}: unknown key '{full}'{_suggest(full)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, prefix + name, source)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str, source: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str):
        raise ConfigError(f"{source}: {key}: expected {expected}, got {value!r}")

    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, source)
    if value is None:
        fail(_describe(hint))
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint_text = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {choices}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail(f"a list of {_describe(args[0])}")
        return [_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"unsupported schema type {hint!r} for {key}")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))
