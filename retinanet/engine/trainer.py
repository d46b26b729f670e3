"""The training loop: one optimisation step and the iteration loop around it; building,
checkpointing, evaluation, reporting, the non-finite guard and distributed plumbing are the small
parts it calls. Iteration-based, as the published detection recipes are."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config, config_to_yaml, save_config
from ..data import build_train_loader
from ..errors import ConfigError
from ..losses import build_criterion
from ..losses.focal import upcast
from ..model import use_fast_memory_format
from .building import (build_datasets, build_optimizer, build_scheduler, build_train_model,
                       configure_determinism, resolve_config, resolve_device, seed_everything)
from .best import BestTracker
from .budget import TimeBudget
from .checkpoint import remove_interrupted_writes
from .checkpointer import Checkpointer, find_resume
from .distributed import (all_reduce_mean, barrier, broadcast_from_main, init_distributed,
                          process_device, sync_batchnorm, wrap_ddp)
from .elastic import checkpoint_written, resume_after_restart
from .ema import ModelEMA
from .guard import NonFiniteGuard
from .reporting import Reporter
from .validation import Validation
from .watchdog import Watchdog

def _part(part: str, name: str) -> property:
    """An attribute of one of the trainer's parts, read and set through the trainer."""
    return property(lambda self: getattr(getattr(self, part), name),
                    lambda self, value: setattr(getattr(self, part), name, value))


class Trainer:
    """`Trainer(config).train()` runs a whole job in `config.output_dir`; `resume` is a checkpoint
    path or "auto" (the latest one in the output folder).

    Under `torchrun` each process is one rank of a DistributedDataParallel job: it trains on its
    slice of every global batch; rank 0 alone logs, writes checkpoints and tensorboard; all ranks
    resume from the same checkpoint and evaluate their shard of the validation set. Restarted by
    `torchrun --max-restarts`, the ranks resume from the job's newest checkpoint (see elastic.py);
    a rank that waits longer than train.dist_timeout_s ends the job (see watchdog.py).
    """
    bad_steps = _part("guard", "bad_steps")  # consecutive steps skipped as non-finite
    defer_finite_checks = _part("guard", "defer")
    _bn_buffers = _part("guard", "bn_buffers")
    writer = _part("reporter", "writer")

    def __init__(self, config: Config, *, resume: Optional[str] = None,
                 log: Callable[[str], None] = print):
        self.start_time = time.perf_counter()  # train.time_budget_s counts from here
        train = config.train
        seed_everything(train.seed)
        device = resolve_device(train.device)
        self.dist = init_distributed(device, train.dist_timeout_s)
        self.device = process_device(device, self.dist)
        self.reporter = Reporter(is_main=self.dist.is_main, max_iter=train.max_iter, log=log)
        self.log = self.reporter.log
        self.watchdog = Watchdog(timeout_s=train.dist_timeout_s, rank=self.dist.rank,
                                 enabled=self.dist.world_size > 1)
        resume = resume_after_restart(resume, self.log)
        self.output_dir = Path(config.output_dir)
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for name in remove_interrupted_writes(self.output_dir):
                self.log(f"removed {name}, left by an interrupted checkpoint write")
        barrier()
        configure_determinism(train.deterministic, self.device)

        self.train_set, self.val_set = build_datasets(config, log=self.log)
        self.config = config = resolve_config(config, self.train_set)  # the caller's stays as given
        if self.dist.is_main:
            save_config(config, self.output_dir / "config.yaml")
        # --resume auto on a first launch finds nothing and starts like a run without --resume
        resume_from = find_resume(resume, self.output_dir, weights=config.model.weights,
                                  log=self.log) if resume else None
        model = build_train_model(config, resuming=resume_from is not None, log=self.log)
        model = sync_batchnorm(model, self.device) if train.sync_bn else model
        self.model = use_fast_memory_format(model.to(self.device), self.device, config.model.channels_last)
        self.network = wrap_ddp(self.model, self.device)  # what the step runs; the parts use self.model
        self.criterion = build_criterion(
            config, config.model.num_classes, self.train_set.class_counts(),
            reduce_num_fg=all_reduce_mean if self.dist.world_size > 1 else None,
            device=self.device).to(self.device)
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer)
        self.use_amp = train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        # On CUDA the step does not wait for the GPU to tell whether it was finite (see NonFiniteGuard).
        self.guard = NonFiniteGuard(
            model=self.model, optimizer=self.optimizer, scaler=self.scaler, scheduler=self.scheduler,
            use_amp=self.use_amp, max_bad_steps=train.max_bad_steps, report=self.reporter.skipped_step,
            defer=self.device.type == "cuda" and bool(self.optimizer.defaults.get("fused")))
        # one average on every rank: their weights are identical after each all-reduced step
        self.ema = ModelEMA(self.model, train.ema.decay) if train.ema.enabled else None
        self.best = BestTracker(train.patience)
        self.budget = TimeBudget(train.time_budget_s, start_time=self.start_time, eval_period=train.eval_period,
                                 checkpoint_period=train.checkpoint_period) if train.time_budget_s else None
        self.length_chosen = False  # by the budget, in this run or the one it resumes
        self.configured_length = (train.max_iter, list(train.scheduler.steps))  # what a budget scales
        self.checkpointer = Checkpointer(
            output_dir=self.output_dir, keep=train.keep_checkpoints, is_main=self.dist.is_main,
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
            criterion=self.criterion, log=self.log, ema=self.ema, metadata={
                "config": config_to_yaml(config), "class_names": list(self.train_set.class_names),
                "category_ids": [self.train_set.label_to_cat_id.get(i, -1)
                                 for i in range(config.model.num_classes)]})
        self.iteration = 0
        self.samples_seen = 0  # the sampler's position in the training stream
        if resume_from is not None:
            counters = self.checkpointer.load(resume_from)
            self.iteration = counters["iteration"]
            self.samples_seen = counters.get("samples_seen", self.iteration * train.batch_size)
            self.bad_steps = counters.get("bad_steps", 0)
            run = counters["run"]
            if "best" in run:
                self.best.load_state_dict(run["best"])
            if "length" in run:  # the length a time budget chose: kept, not measured again
                self.set_length(**run["length"])
                self.budget = None
        self.validation = None if self.val_set is None else Validation(
            config, dataset=self.val_set, model=self.ema.module if self.ema else self.model,
            criterion=self.criterion, device=self.device,
            dist=self.dist, output_dir=self.output_dir, log=self.log)
        self.reporter.open_tensorboard(self.output_dir / "tensorboard")

    # ----------------------------------------------------------------------------------------
    def train(self) -> Optional[dict]:
        """Trains to train.max_iter, then saves model_final.pth and returns the final evaluation
        (None without a validation set)."""
        cfg, data, world = self.config.train, self.config.data, self.dist.world_size
        batches = iter(build_train_loader(
            self.train_set, batch_size=cfg.batch_size, num_workers=data.num_workers, seed=cfg.seed,
            size_divisibility=data.size_divisibility, start_position=self.samples_seen,
            rank=self.dist.rank, world_size=world,
            group_ids=self.train_set.aspect_groups() if data.aspect_ratio_grouping else None))
        processes = f" x {world} processes" if world > 1 else ""
        self.log(f"training {self.config.output_dir}: {len(self.train_set)} images, "
                 f"{self.model.num_classes} classes, iterations {self.iteration}..{cfg.max_iter}, "
                 f"batch {cfg.batch_size}{processes}, device {self.device}")
        self.model.train()
        self.reporter.start(self.iteration)
        # with a budget, max_iter is only a bound once the budget has chosen it
        while self.iteration < cfg.max_iter or (self.budget is not None and not self.length_chosen):
            fetch_start = time.perf_counter()
            with self.watchdog.waiting("its data loader", self.iteration + 1):
                batch = next(batches).to(self.device, non_blocking=True)
            data_time = time.perf_counter() - fetch_start  # time the step waited for data
            with self.watchdog.waiting("its training step and the other ranks' gradients", self.iteration + 1):
                losses = self.step(batch)
            if self.ema is not None and losses is not None:
                self.ema.update(self.model)
            self.iteration += 1
            now = time.perf_counter()
            if self.budget is not None and self.budget.observe(self.iteration, now, now - fetch_start):
                self.choose_length()
            self.samples_seen += len(batch.image_ids) * world
            self.reporter.add_step(losses, len(batch.image_ids) * world, data_time)
            if self.iteration % cfg.log_period == 0 or self.iteration == cfg.max_iter:
                self.settle_skipped_steps()
                self.reporter.write_window(self.iteration, self.optimizer.param_groups[0]["lr"])
            if _periodic(self.iteration, cfg.checkpoint_period, cfg.max_iter):
                self.save(f"model_{self.iteration:07d}.pth")
            if _periodic(self.iteration, cfg.eval_period, cfg.max_iter):
                self.keep_best(self.evaluate())
                self.model.train()
                if self.best.stop:
                    self.log(f"stopping early at iteration {self.iteration}: {self.best.reason()}")
                    break
        self.reporter.stop()
        self.save("model_final.pth")
        self.reporter.done()
        result = self.evaluate(visualize=True) if self.validation is not None else None
        if result is not None and cfg.eval_period:
            self.keep_best(result)
        self.writer.close()
        return result

    def keep_best(self, result: dict) -> None:
        """model_best.pth when this evaluation's AP is the best so far (not a restart point)."""
        if self.best.update(result["metrics"]["AP"], self.iteration):
            self.checkpointer.save("model_best.pth", iteration=self.iteration, samples_seen=self.samples_seen,
                                   bad_steps=self.bad_steps, run=self.run_state())

    def choose_length(self) -> None:
        """train.time_budget_s: the run's length from the measured speed and evaluation cost
        (rank 0's choice on every rank), into the run's state and its folder's config.yaml; the
        first plan is logged, later ones when they move the end by more than 2% from the last logged."""
        previous = self.budget.chosen
        if previous is None:
            chosen = self.budget.choose(self.iteration, time.perf_counter(),
                                        self.validation.estimate_seconds() if self.validation is not None else 0.0,
                                        self.checkpointer.estimate_seconds())
        else:
            chosen = self.budget.choose(self.iteration, time.perf_counter())
        chosen = broadcast_from_main(chosen)
        self.budget.chosen = chosen
        if chosen == self.config.train.max_iter and self.length_chosen:
            return
        configured, steps = self.configured_length
        self.set_length(chosen, [round(step * chosen / configured) for step in steps])
        if previous is None:
            self.log(self.budget.describe(configured))
            self.logged_length = chosen
        elif abs(chosen - self.logged_length) > 0.02 * self.logged_length:
            self.log(self.budget.describe_change(self.logged_length))
            self.logged_length = chosen

    def set_length(self, max_iter: int, steps: list[int]) -> None:
        """The run's max_iter and multistep steps (the cosine schedule reads max_iter), in this
        trainer's own config: the caller's stays as given."""
        train = self.config.train
        train.max_iter, train.scheduler.steps = max_iter, list(steps)
        self.reporter.max_iter, self.length_chosen = max_iter, True
        self.checkpointer.metadata["config"] = config_to_yaml(self.config)
        if self.dist.is_main:
            save_config(self.config, self.output_dir / "config.yaml")

    def run_state(self) -> dict:
        """The run's own state for checkpoints: best AP and patience count, a budget's length."""
        state = {"best": self.best.state_dict()}
        if self.length_chosen:
            state["length"] = {"max_iter": self.config.train.max_iter,
                               "steps": list(self.config.train.scheduler.steps)}
        return state

    def step(self, batch) -> Optional[dict[str, torch.Tensor]]:
        """One optimisation step; returns the detached losses, or None when the step was skipped
        because its loss or gradient is not finite (weights and BatchNorm statistics unchanged).
        On CPU that check is immediate. With defer_finite_checks (CUDA) nothing waits for the
        device: the losses come back zeroed, with "steps" 0, for a skipped step, which is logged
        at the next settle_skipped_steps."""
        saved_stats = self.guard.snapshot()
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
        result = {"loss": total.detach(), "loss_cls": losses["loss_cls"].detach(),
                  "loss_box": losses["loss_box"].detach(), "num_fg": losses["num_fg"].float(),
                  "grad_norm": grad_norm.detach().float()}
        return self.guard.step(total, grad_norm, result, saved_stats, self.iteration + 1, batch.image_ids)

    def settle_skipped_steps(self) -> None:
        """Reads the deferred finiteness checks (see NonFiniteGuard.settle); no-op on CPU."""
        self.guard.settle()

    def evaluate(self, visualize: bool = False) -> dict:
        if self.validation is None:
            raise ConfigError("no validation set: set data.val.images and data.val.annotations")
        self.settle_skipped_steps()
        result, drawn = self.validation(visualize=visualize, progress=self.reporter.eval_progress)
        self.reporter.evaluation(result, drawn, self.iteration)
        return result

    def save(self, name: str) -> Path:
        """Writes output_dir/name (see Checkpointer.save), then keeps only the newest
        train.keep_checkpoints periodic ones."""
        self.settle_skipped_steps()  # the checkpoint's bad_steps must be current
        path = self.checkpointer.save(name, iteration=self.iteration, samples_seen=self.samples_seen,
                                      bad_steps=self.bad_steps, run=self.run_state())
        if self.dist.is_main:
            checkpoint_written(path)  # where a torchrun restart resumes
        return path


def _periodic(iteration: int, period: int, max_iter: int) -> bool:
    """Every `period` iterations (0: never) but the last, which train() ends with anyway."""
    return bool(period) and iteration % period == 0 and iteration < max_iter


def _grad_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
