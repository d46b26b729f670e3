"""A training run's pieces from its config: device, seeds, datasets, the model to train, the
optimizer and its learning-rate schedule. Nothing here writes into the caller's config."""
from __future__ import annotations

import copy
import logging
import math
import os
import random
from functools import partial
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import CocoDetection, build_dataset
from ..errors import ConfigError, DataError
from ..model import build_model
from ..weights import load_model_weights

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_determinism(enabled: bool, device: torch.device) -> None:
    """Deterministic kernels only. On CPU an op without one is an error; on CUDA a warning (the
    model's own ops have deterministic kernels: see the FPN's upsampling)."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available (use 'cpu' or 'auto')")
    return torch.device(name)


def build_datasets(config: Config, *,
                   log: Callable[[str], None]) -> tuple[CocoDetection, Optional[CocoDetection]]:
    """The checked training set, and the validation set (None without data.val.annotations);
    both splits must list the same categories."""
    train_set = build_dataset(config.data, train=True, check=True, log=log)
    train_set.report_dropped()
    if not config.data.val.annotations:
        if config.train.eval_period:
            raise ConfigError("train.eval_period is set but data.val.annotations is empty")
        return train_set, None
    val_set = build_dataset(config.data, train=False, check=True, log=log)
    if val_set.cat_ids != train_set.cat_ids or val_set.class_names != train_set.class_names:
        raise DataError(f"{config.data.val.annotations} and {config.data.train.annotations} "
                        "list different categories; both splits need the same ids and names")
    return train_set, val_set


def resolve_config(config: Config, train_set: CocoDetection) -> Config:
    """A copy of `config` with model.num_classes from the training set; the caller's stays as given."""
    num_classes = train_set.num_classes
    if config.model.num_classes is not None and config.model.num_classes != num_classes:
        raise ConfigError(f"model.num_classes is {config.model.num_classes} but "
                          f"{config.data.train.annotations} has {num_classes} categories "
                          "(leave model.num_classes unset to derive it)")
    config = copy.deepcopy(config)
    config.model.num_classes = num_classes
    return config


def build_train_model(config: Config, *, resuming: bool, log: Callable[[str], None]) -> nn.Module:
    """The model to train, on the CPU, initialised from model.weights (layers whose shape differs
    re-initialised) unless `resuming`, where the checkpoint's weights replace any start."""
    backbone, init_weights = config.model.backbone, None if resuming else config.model.weights
    if backbone.norm == "frozen_bn" and not backbone.weights and not init_weights and not resuming:
        logger.warning("model.backbone.norm is frozen_bn but model.backbone.weights is not set: "
                       "the backbone's normalisation stays at its random initialisation "
                       "(set the weights path, or use norm: bn to train from scratch)")
    model = build_model(config.model, config.model.num_classes, load_backbone_weights=not init_weights)
    if init_weights:
        skipped = load_model_weights(model, init_weights, skip_mismatched=True)
        log(f"initialised from {init_weights}" + (
            f"; re-initialised (shape differs): {', '.join(skipped)}" if skipped else ""))
    return model


def build_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights; `weight_decay_norm` on norm parameters and biases."""
    opt = config.train.optimizer
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    groups = [{"params": decay, "weight_decay": opt.weight_decay},
              {"params": no_decay, "weight_decay": opt.weight_decay_norm}]
    # fused=True where torch has the kernel for these parameters (CPU and CUDA since torch 2.4):
    # one kernel per step, and the step can be skipped on a device-side flag (found_inf).
    if opt.type == "sgd":
        make = partial(torch.optim.SGD, groups, lr=opt.lr, momentum=opt.momentum)
    else:
        make = partial(torch.optim.AdamW, groups, lr=opt.lr, betas=tuple(opt.betas))
    try:
        optimizer = make(fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        optimizer = make(fused=False)
    if optimizer.defaults.get("fused") and opt.type == "sgd" and opt.momentum:
        # A fused step skipped on found_inf before any real step leaves an *uninitialised*
        # momentum buffer behind; zeros give the first real step exactly what SGD does (buf = grad).
        for group in optimizer.param_groups:
            for param in group["params"]:
                optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)
    return optimizer


def lr_factor(config: Config, iteration: int) -> float:
    """LR multiplier at `iteration`: linear warm-up from warmup_factor, then multistep or cosine."""
    s, max_iter = config.train.scheduler, config.train.max_iter
    if s.type == "multistep":
        factor = s.gamma ** sum(iteration >= step for step in s.steps)
    else:
        progress = min(1.0, iteration / max(1, max_iter))
        factor = s.min_lr_factor + (1 - s.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if iteration < s.warmup_iters:
        alpha = iteration / s.warmup_iters
        factor *= s.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(config: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    # a lambda, not a partial: LambdaLR's state_dict stores a callable object's __dict__
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(config, iteration))
