"""The training loop: wires config -> data -> model -> criterion, optimises, logs, checkpoints,
evaluates. Iteration-based, as the published detection recipes are."""
from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import random
import sys
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import Config, config_to_yaml, save_config
from ..data import build_dataset, build_test_loader, build_train_loader
from ..detector import Detector
from ..losses import build_box_coder, build_criterion
from ..losses.focal import upcast
from ..model import build_model, use_fast_memory_format
from ..postprocess import build_postprocessor
from ..data.transforms import build_transform
from ..visualize import draw_detections
from ..errors import ConfigError, DataError, MissingFileError, TrainingDiverged
from .checkpoint import (FORMAT, VERSION, atomic_save, latest_checkpoint, load_checkpoint,
                         load_model_weights, remove_interrupted_writes, rng_state, set_rng_state)
from .distributed import (all_reduce_max, all_reduce_mean, barrier, broadcast_buffers,
                          init_distributed)
from .evaluator import METRIC_NAMES, Evaluator

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


def _grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available (use 'cpu' or 'auto')")
    return torch.device(name)


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


class Trainer:
    """`Trainer(config).train()` runs a whole job in `config.output_dir`; `resume` is a checkpoint
    path or "auto" (the latest one in the output folder).

    Under `torchrun` each process is one rank of a DistributedDataParallel job: it trains on its
    slice of every global batch; rank 0 alone logs, writes checkpoints and tensorboard; all ranks
    resume from the same checkpoint and evaluate their shard of the validation set.
    """

    def __init__(self, config: Config, *, resume: Optional[str] = None,
                 log: Callable[[str], None] = print):
        config = copy.deepcopy(config)  # resolved below (num_classes); the caller's stays as given
        self.config = config
        seed_everything(config.train.seed)
        self.device = resolve_device(config.train.device)
        self.dist = init_distributed(self.device, config.train.dist_timeout_s)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
        self._bar = None  # tqdm progress bar while training at a terminal
        self._user_log = log
        self.log = self._emit if self.dist.is_main else (lambda message: None)
        self.output_dir = Path(config.output_dir)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for name in remove_interrupted_writes(self.output_dir):
                self.log(f"removed {name}, left by an interrupted checkpoint write")
        barrier()
        configure_determinism(config.train.deterministic, self.device)

        self.train_set = build_dataset(config.data, train=True, check=True, log=self.log)
        self.train_set.report_dropped()
        num_classes = self.train_set.num_classes
        if config.model.num_classes is not None and config.model.num_classes != num_classes:
            raise ConfigError(f"model.num_classes is {config.model.num_classes} but "
                             f"{config.data.train.annotations} has {num_classes} categories "
                             "(leave model.num_classes unset to derive it)")
        config.model.num_classes = num_classes
        if self.dist.is_main:
            save_config(config, self.output_dir / "config.yaml")

        backbone = config.model.backbone
        # --resume auto on a first launch finds nothing and starts like a run without --resume
        resume_from = self._resume_path(resume) if resume else None
        init_weights = config.model.weights if resume_from is None else None
        if backbone.norm == "frozen_bn" and not backbone.weights and not init_weights and not resume_from:
            logger.warning("model.backbone.norm is frozen_bn but model.backbone.weights is not set: "
                           "the backbone's normalisation stays at its random initialisation "
                           "(set the weights path, or use norm: bn to train from scratch)")
        model = build_model(config.model, num_classes, load_backbone_weights=not init_weights)
        if init_weights:
            skipped = load_model_weights(model, init_weights, skip_mismatched=True)
            self.log(f"initialised from {init_weights}" + (
                f"; re-initialised (shape differs): {', '.join(skipped)}" if skipped else ""))
        if config.train.sync_bn and self.dist.world_size > 1:
            if self.device.type != "cuda":
                raise ConfigError("train.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel): set "
                                 "train.sync_bn=false for CPU processes")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = use_fast_memory_format(model.to(self.device), self.device,
                                            config.model.channels_last)
        # What the step runs: the DDP wrapper (gradients averaged over ranks) or the model itself.
        # Evaluation and checkpoints use self.model, never the wrapper.
        self.network: nn.Module = self.model
        if self.dist.world_size > 1:
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.criterion = build_criterion(
            config, num_classes, self.train_set.class_counts(),
            reduce_num_fg=all_reduce_mean if self.dist.world_size > 1 else None).to(self.device)
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: lr_factor(config, it))
        self.use_amp = config.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.iteration = 0
        self.samples_seen = 0  # the sampler's position in the training stream
        self.bad_steps = 0  # consecutive steps skipped for a non-finite loss or gradient
        # On CUDA the step does not wait for the GPU to tell whether it was finite: the fused
        # optimizer skips on a device-side flag, and the flags are read once per log window
        # (settle_skipped_steps). On CPU there is nothing to wait for: each step is checked at once.
        self.defer_finite_checks = self.device.type == "cuda" and bool(self.optimizer.defaults.get("fused"))
        self._unsettled: list[tuple] = []  # deferred mode: (iteration, image ids, skip flag, losses)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        # Trainable BatchNorm updates its statistics in the forward pass; a skipped step restores them.
        self._bn_buffers = [buf for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                            for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
                            if buf is not None]
        if resume_from is not None:
            self._resume(resume_from)

        self.val_set = None
        if config.data.val.annotations:
            self.val_set = build_dataset(config.data, train=False, check=True, log=self.log)
            if self.val_set.cat_ids != self.train_set.cat_ids or \
                    self.val_set.class_names != self.train_set.class_names:
                raise DataError(f"{config.data.val.annotations} and {config.data.train.annotations} "
                                 "list different categories; both splits need the same ids and names")
        elif config.train.eval_period:
            raise ConfigError("train.eval_period is set but data.val.annotations is empty")
        self.detector = Detector(self.model, transform=build_transform(config.data, train=False),
                                 postprocessor=build_postprocessor(config, build_box_coder(config)),
                                 size_divisibility=config.data.size_divisibility,
                                 class_names=self.train_set.class_names,
                                 label_to_cat_id=self.train_set.label_to_cat_id, device=self.device,
                                 channels_last=config.model.channels_last)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard")) \
            if self.dist.is_main else _NoWriter()

    def _emit(self, message: str) -> None:
        if self._bar is not None and self._user_log is print:
            self._bar.write(message)  # above the bar, which stays at the bottom
        else:
            self._user_log(message)

    # ----------------------------------------------------------------------------------------
    def train(self) -> Optional[dict]:
        cfg = self.config.train
        world = self.dist.world_size
        loader = build_train_loader(self.train_set, batch_size=cfg.batch_size,
                                    num_workers=self.config.data.num_workers, seed=cfg.seed,
                                    size_divisibility=self.config.data.size_divisibility,
                                    start_position=self.samples_seen, rank=self.dist.rank,
                                    world_size=world, group_ids=self.train_set.aspect_groups()
                                    if self.config.data.aspect_ratio_grouping else None)
        processes = f" x {world} processes" if world > 1 else ""
        self.log(f"training {self.config.output_dir}: {len(self.train_set)} images, "
                 f"{self.model.num_classes} classes, iterations {self.iteration}..{cfg.max_iter}, "
                 f"batch {cfg.batch_size}{processes}, device {self.device}")
        self.model.train()
        data_iter = iter(loader)
        start_time, window_time, window_images = time.perf_counter(), time.perf_counter(), 0
        start_iter = self.iteration
        sums: dict[str, torch.Tensor] = {}
        window_iters, window_data_time, window_start = 0, 0.0, self.iteration
        self._bar = _progress_bar(self.dist.is_main, total=cfg.max_iter, initial=self.iteration,
                                  desc="training", unit="it")
        while self.iteration < cfg.max_iter:
            fetch_start = time.perf_counter()
            batch = next(data_iter).to(self.device, non_blocking=True)
            window_data_time += time.perf_counter() - fetch_start  # time the step waited for data
            losses = self.step(batch)
            if self._bar is not None:
                self._bar.update(1)
            self.iteration += 1
            self.samples_seen += len(batch.image_ids) * world
            window_images += len(batch.image_ids) * world
            if losses is not None:
                window_iters = window_iters + losses.pop("steps", 1)  # a tensor when deferred
                for key, value in losses.items():
                    sums[key] = sums.get(key, 0) + value.detach()

            if self.iteration % cfg.log_period == 0 or self.iteration == cfg.max_iter:
                self.settle_skipped_steps()
                now = time.perf_counter()
                window_iters = float(window_iters)  # one sync a window
                means = {k: float(v) / window_iters for k, v in sums.items()} if window_iters else {}
                data_time = window_data_time / (self.iteration - window_start)
                sums, window_iters, window_data_time, window_start = {}, 0, 0.0, self.iteration
                ips = window_images / max(now - window_time, 1e-9)
                eta = (now - start_time) / (self.iteration - start_iter) * (cfg.max_iter - self.iteration)
                self._log_step(means, ips, eta, data_time)
                window_time, window_images = now, 0
            if cfg.checkpoint_period and self.iteration % cfg.checkpoint_period == 0 \
                    and self.iteration < cfg.max_iter:
                self.save(f"model_{self.iteration:07d}.pth")
            if cfg.eval_period and self.iteration % cfg.eval_period == 0 and self.iteration < cfg.max_iter:
                self.evaluate()
                self.model.train()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.save("model_final.pth")
        self.log(f"training done in {datetime.timedelta(seconds=int(time.perf_counter() - start_time))}")
        result = self.evaluate(visualize=True) if self.val_set is not None else None
        self.writer.close()
        return result

    def step(self, batch) -> Optional[dict[str, torch.Tensor]]:
        """One optimisation step; returns the detached losses, or None when the step was skipped
        because its loss or gradient is not finite (weights and BatchNorm statistics unchanged).
        On CPU that check is immediate. With defer_finite_checks (CUDA) nothing waits for the
        device: the losses come back zeroed, with "steps" 0, for a skipped step, which is logged
        at the next settle_skipped_steps."""
        saved_stats = [buf.clone() for buf in self._bn_buffers]
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            out = self.network(batch.images.to(self._params[0].dtype))  # float64 models: see tests
        # The loss runs in at least float32 whatever the forward's precision (see losses/focal.py).
        losses = self.criterion(upcast(out.cls_logits), upcast(out.box_deltas), out.anchors,
                                batch.boxes, batch.labels)
        total = losses["loss_cls"] + losses["loss_box"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.use_amp:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.train.clip_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(self._params, clip) if clip else _grad_norm(self._params)
        # Under AMP an overflowing gradient is the scaler's business (it skips and lowers the scale).
        finite = torch.isfinite(total) & (torch.isfinite(grad_norm) | self.use_amp)
        # Every rank takes the same decision (DDP already shares non-finite gradients; a loss that
        # is non-finite on one rank only would otherwise desynchronise the AMP scalers).
        skip = all_reduce_max((~finite).float())  # () 1.0: skip this step
        result = {"loss": total.detach(), "loss_cls": losses["loss_cls"].detach(),
                  "loss_box": losses["loss_box"].detach(), "num_fg": losses["num_fg"].float(),
                  "grad_norm": grad_norm.detach().float()}
        if self.defer_finite_checks:
            return self._step_or_skip_on_device(batch, result, skip, saved_stats)
        if bool(skip):  # the step's one host sync (none on CUDA: see defer_finite_checks)
            self.optimizer.zero_grad(set_to_none=True)
            for buf, saved in zip(self._bn_buffers, saved_stats):
                buf.copy_(saved)
            self._scheduler_step()
            self._count_step(self.iteration + 1, batch.image_ids, result)
            return None
        self._count_step(self.iteration + 1, batch.image_ids, None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return result

    def _step_or_skip_on_device(self, batch, result: dict, skip: torch.Tensor,
                                saved_stats: list) -> dict:
        """The step without a host sync: the fused optimizer leaves weights and state untouched
        when `skip` (under AMP, when the scaler's own overflow flag) is set, BatchNorm statistics
        are restored with a select, and the flag waits in _unsettled for settle_skipped_steps.
        Returns the losses zeroed on a skipped step, with "steps" = 1 or 0."""
        for buf, saved in zip(self._bn_buffers, saved_stats):
            buf.copy_(torch.where(skip > 0, saved, buf))
        if not self.use_amp:  # under AMP the scaler sets found_inf (a NaN loss gives NaN grads)
            self.optimizer.found_inf = skip
        try:
            self.scaler.step(self.optimizer)
        finally:
            if not self.use_amp:
                del self.optimizer.found_inf
        self.scaler.update()
        self._scheduler_step()
        self._unsettled.append((self.iteration + 1, batch.image_ids, skip, result))
        kept = {key: torch.where(skip > 0, torch.zeros_like(value), value) for key, value in result.items()}
        kept["steps"] = 1 - skip
        return kept

    def settle_skipped_steps(self) -> None:
        """Reads the deferred finiteness flags (one host sync), logs the skipped steps and stops
        after train.max_bad_steps in a row, as the immediate check does. No-op on CPU."""
        if not self._unsettled:
            return
        pending, self._unsettled = self._unsettled, []
        flags = torch.stack([skip for _, _, skip, _ in pending]).tolist()
        for (iteration, image_ids, _, result), flag in zip(pending, flags):
            self._count_step(iteration, image_ids, result if flag else None)

    def _scheduler_step(self) -> None:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()" on a skipped step
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # a skipped iteration still counts: the schedule stays on time

    def _count_step(self, iteration: int, image_ids, skipped: Optional[dict]) -> None:
        """Counts consecutive skipped steps; `skipped` holds a skipped step's losses, None for a
        good step."""
        if skipped is None:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.writer.add_scalar("train/skipped_step", 1, iteration)
        self.log(f"iteration {iteration}: non-finite loss or gradient (loss_cls "
                 f"{float(skipped['loss_cls']):.4g}, loss_box {float(skipped['loss_box']):.4g}, grad norm "
                 f"{float(skipped['grad_norm']):.4g}); step skipped, weights unchanged; image ids {image_ids}")
        if self.bad_steps >= self.config.train.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_steps} consecutive steps with a non-finite loss or gradient (the last at "
                f"iteration {iteration}, image ids {image_ids}); stopping. Check the data with "
                "tools/check_dataset.py, lower train.optimizer.lr or set train.clip_grad_norm")

    def _log_step(self, means: dict[str, float], images_per_sec: float, eta: float,
                  data_time: float = 0.0) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.writer.add_scalar("train/data_time", data_time, self.iteration)
        if not means:
            self.log(f"iter {self.iteration:>6}/{self.config.train.max_iter}  every step since the "
                     "last line was skipped")
            return
        for key, value in means.items():
            self.writer.add_scalar(f"train/{key}", value, self.iteration)
        self.writer.add_scalar("train/lr", lr, self.iteration)
        self.writer.add_scalar("train/images_per_sec", images_per_sec, self.iteration)
        if self._bar is not None:  # the bar shows progress and ETA; the losses ride along
            self._bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{lr:.5f}", refresh=False)
        self.log(f"iter {self.iteration:>6}/{self.config.train.max_iter}  loss {means['loss']:.4f} "
                 f"(cls {means['loss_cls']:.4f} box {means['loss_box']:.4f})  lr {lr:.5f}  "
                 f"{images_per_sec:5.1f} img/s  data {1000 * data_time:.0f} ms  "
                 f"eta {datetime.timedelta(seconds=int(eta))}")

    # ----------------------------------------------------------------------------------------
    def evaluate(self, visualize: bool = False) -> dict:
        if self.val_set is None:
            raise ConfigError("no validation set: set data.val.images and data.val.annotations")
        self.settle_skipped_steps()
        broadcast_buffers(self.model)
        loader = build_test_loader(self.val_set, batch_size=self.config.eval.batch_size,
                                   num_workers=self.config.data.num_workers,
                                   size_divisibility=self.config.data.size_divisibility,
                                   rank=self.dist.rank, world_size=self.dist.world_size)
        ev = self.config.eval
        evaluator = Evaluator(self.val_set, loader, output_dir=self.output_dir / "eval",
                              max_dets=ev.max_dets, backend=ev.backend, pr_curves=ev.pr_curves,
                              progress=self._bar is None and _interactive() and self.dist.is_main)
        val_losses: dict[str, torch.Tensor] = {}

        def add_val_loss(out, batch) -> None:
            # The training loss on validation images (eval mode: BatchNorm uses its statistics).
            losses = self.criterion(upcast(out.cls_logits), upcast(out.box_deltas), out.anchors,
                                    [b.to(self.device) for b in batch.boxes],
                                    [lab.to(self.device) for lab in batch.labels])
            for key in ("loss_cls", "loss_box"):
                val_losses[key] = val_losses.get(key, 0) + losses[key].detach() * len(batch.image_ids)
            val_losses["images"] = val_losses.get("images", 0) + len(batch.image_ids)

        def predict(batch):
            return self.detector.predict_batch(batch, on_outputs=add_val_loss if ev.val_loss else None)

        self.criterion.eval()  # per-rank normaliser: ranks run different numbers of validation batches
        try:
            result = evaluator(predict, log=self.log)
        finally:
            self.criterion.train()
        for name in METRIC_NAMES[:6]:
            self.writer.add_scalar(f"eval/{name}", result["metrics"][name], self.iteration)
        for name, ap in result["per_class"].items():
            self.writer.add_scalar(f"eval_per_class/AP/{name}", ap, self.iteration)
        if ev.val_loss:
            totals = torch.stack([torch.as_tensor(val_losses.get(k, 0.0), dtype=torch.float32,
                                                  device=self.device).reshape(())
                                  for k in ("loss_cls", "loss_box", "images")])
            totals = all_reduce_mean(totals)  # sums over ranks / world: the ratio is unchanged
            loss_cls, loss_box = (totals[:2] / totals[2].clamp(min=1)).tolist()
            result["val_loss"] = {"loss_cls": loss_cls, "loss_box": loss_box, "loss": loss_cls + loss_box}
            for key, value in result["val_loss"].items():
                self.writer.add_scalar(f"val/{key}", value, self.iteration)
            self.log(f"validation loss {loss_cls + loss_box:.4f} (cls {loss_cls:.4f} box {loss_box:.4f})")
        if self.dist.is_main:
            drawn = write_visualizations(self.val_set, result["predictions"],
                                         self.output_dir / "vis" if visualize else None,
                                         ev.num_vis_images, ev.vis_score_thresh)
            for image_id, image in drawn:  # every evaluation: predictions (colour) and truth (white)
                self.writer.add_image(f"val_images/{image_id}", image, self.iteration, dataformats="HWC")
        return result

    def save(self, name: str) -> Path:
        """Writes a checkpoint atomically, then keeps only the newest train.keep_checkpoints
        periodic ones. Refuses (TrainingDiverged) to write weights that are not finite."""
        path = self.output_dir / name
        self.settle_skipped_steps()  # the checkpoint's bad_steps must be current
        broadcast_buffers(self.model)
        state = self.model.state_dict()
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingDiverged(f"not writing {path}: non-finite values in {bad[:5]}")
        if not self.dist.is_main:  # the weights are the same on every rank: rank 0 writes them
            return path
        # plain data only (see checkpoint.py): loadable with weights_only=True
        labels = range(self.model.num_classes)
        atomic_save({"format": FORMAT, "version": VERSION, "model": state,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "criterion": self.criterion.state_dict(),
                     "iteration": self.iteration, "samples_seen": self.samples_seen,
                     "bad_steps": self.bad_steps, "rng": rng_state(), "config": config_to_yaml(self.config),
                     "class_names": list(self.train_set.class_names),
                     "category_ids": [self.train_set.label_to_cat_id.get(i, -1) for i in labels]}, path)
        periodic = sorted(self.output_dir.glob("model_[0-9]*.pth"))
        for old in periodic[: max(0, len(periodic) - self.config.train.keep_checkpoints)]:
            old.unlink()
        return path

    def _resume_path(self, resume: str) -> Optional[Path]:
        """The checkpoint `resume` names: a path, or "auto" for the newest one in output_dir
        (None when there is none yet: a first launch)."""
        if resume != "auto":
            if not Path(resume).is_file():
                raise MissingFileError(f"--resume {resume}: checkpoint not found")
            return Path(resume)
        path = latest_checkpoint(self.output_dir)
        if path is None:
            start = f"from {self.config.model.weights}" if self.config.model.weights else "from scratch"
            self.log(f"--resume auto: no checkpoint in {self.output_dir} yet, starting {start}")
        return path

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the checkpoint was written without AMP
            self.scaler.load_state_dict(state["scaler"])
        self.criterion.load_state_dict(state["criterion"])
        self.iteration = int(state["iteration"])
        self.samples_seen = int(state.get("samples_seen", self.iteration * self.config.train.batch_size))
        self.bad_steps = int(state.get("bad_steps", 0))
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at iteration {self.iteration}")


class _NoWriter:
    """Stands in for tensorboard's SummaryWriter on ranks other than 0."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


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


def _interactive() -> bool:
    """Progress bars only for a person at a terminal: not in CI logs or redirected output."""
    return sys.stderr.isatty() and not os.environ.get("CI")


def _progress_bar(is_main: bool, **kwargs):
    """A tqdm bar on rank 0 at a terminal, else None (one log line per log_period instead)."""
    if not (is_main and _interactive()):
        return None
    from tqdm import tqdm
    return tqdm(dynamic_ncols=True, **kwargs)
