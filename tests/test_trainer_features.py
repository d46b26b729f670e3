"""The trainer's EMA weights, best checkpoint, early stop and time budget, end to end on the tiny
config (real training, evaluation and checkpoints)."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from retinanet.config import load_config
from retinanet.detector import Detector
from retinanet.engine.trainer import Trainer
from retinanet.weights import load_checkpoint


def _quiet(cfg):
    cfg.eval.num_vis_images, cfg.eval.pr_curves = 0, False
    cfg.train.deterministic = True
    return cfg


def test_ema_weights_are_the_checkpoints_model_and_resume_exactly(tiny_config):
    cfg = _quiet(tiny_config)
    cfg.data.val.annotations = ""  # no evaluation needed here
    cfg.train.max_iter, cfg.train.checkpoint_period = 6, 3
    cfg.train.ema.enabled, cfg.train.ema.decay = True, 0.9
    Trainer(cfg, log=lambda s: None).train()
    out = cfg.output_dir
    final = load_checkpoint(f"{out}/model_final.pth")
    assert final["ema"] == {"updates": 6, "decay": 0.9}
    assert final["model"].keys() == final["model_raw"].keys()
    weight = "head.cls_score.weight"
    assert not torch.equal(final["model"][weight], final["model_raw"][weight])  # averaged, not raw
    # everything that reads the checkpoint's model gets the averaged weights
    detector = Detector.from_checkpoint(f"{out}/model_final.pth", device="cpu")
    assert torch.equal(detector.model.state_dict()[weight], final["model"][weight])

    # resumed at iteration 3: the same raw weights, average and update count as uninterrupted
    resumed = Trainer(load_config(f"{out}/config.yaml", [f"output_dir={out}_resumed"]),
                      resume=f"{out}/model_0000003.pth", log=lambda s: None)
    assert resumed.iteration == 3 and resumed.ema.updates == 3
    resumed.train()
    again = load_checkpoint(f"{out}_resumed/model_final.pth")
    for entry in ("model", "model_raw"):
        for key, value in final[entry].items():
            assert torch.equal(again[entry][key], value), (entry, key)
    assert again["ema"] == final["ema"]


def test_best_checkpoint_and_patience_follow_the_evaluations(tiny_config):
    cfg = _quiet(tiny_config)
    cfg.train.max_iter, cfg.train.eval_period, cfg.train.patience = 12, 1, 2
    cfg.model.postprocess.score_thresh = 0.001  # detections exist from the first iterations
    logs, aps = [], []
    trainer = Trainer(cfg, log=logs.append)
    evaluate = trainer.evaluate

    def recorded(*args, **kwargs):  # the real evaluation, its AP noted
        result = evaluate(*args, **kwargs)
        aps.append((trainer.iteration, result["metrics"]["AP"]))
        return result

    trainer.evaluate = recorded
    trainer.train()
    # replay the rule on the APs the run measured: where it had to stop, and which was best
    best, since, stop_at = -1.0, 0, None
    for iteration, ap in aps[:-1]:  # the last is the final evaluation, after the loop
        best, since = (ap, 0) if ap > best else (best, since + 1)
        if since >= 2:
            stop_at = iteration
            break
    best_iteration = next(i for i, ap in aps if ap == max(a for _, a in aps))
    assert trainer.iteration == (stop_at or 12)
    assert load_checkpoint(f"{cfg.output_dir}/model_best.pth")["iteration"] == best_iteration
    assert load_checkpoint(f"{cfg.output_dir}/model_best.pth")["run"]["best"]["best_ap"] == max(a for _, a in aps)
    assert (stop_at is not None) == any(line.startswith(f"stopping early at iteration {stop_at}") for line in logs)


def test_time_budget_chooses_the_length_and_ends_near_the_budget(tiny_config):
    cfg = _quiet(tiny_config)
    cfg.train.deterministic = False
    budget = 30.0
    cfg.train.max_iter, cfg.train.time_budget_s, cfg.train.checkpoint_period = 100_000, budget, 40
    cfg.train.scheduler.type, cfg.train.scheduler.steps = "multistep", [60_000, 80_000]
    cfg.train.batch_size = 2  # short steps: the measuring window stays a small part of the budget under load
    before = copy.deepcopy(cfg)
    logs = []
    trainer = Trainer(cfg, log=logs.append)
    steps = []  # (iteration, seconds) of every step, timed alike before and after the choice
    step = trainer.step

    def timed(batch):
        began = time.perf_counter()
        out = step(batch)
        steps.append((trainer.iteration + 1, time.perf_counter() - began))
        return out

    trainer.step = timed
    trainer.train()
    elapsed = time.perf_counter() - trainer.start_time  # the budget counts from there
    chosen = trainer.config.train.max_iter
    # The length is planned from steps 6-25, then again every 50 steps from the time really left,
    # so other load on the machine is corrected for, except after the last plan: stated margin,
    # 10% of the budget plus the last 50 steps at the speed they really ran.
    last = sum(s for _, s in steps[-trainer.budget.replan_every:])
    assert abs(elapsed - budget) <= 0.10 * budget + last, (elapsed, last, chosen, logs[-5:])
    assert 25 < chosen < 100_000 and trainer.iteration == chosen
    assert trainer.config.train.scheduler.steps == [round(60_000 * chosen / 100_000), round(80_000 * chosen / 100_000)]
    first = trainer.budget.first_choice
    assert any(line.startswith(f"time budget {budget:g} s") and f"max_iter {first}" in line for line in logs)
    assert cfg == before  # the caller's config is left alone
    out = cfg.output_dir
    assert load_config(f"{out}/config.yaml").train.max_iter == chosen
    final = load_checkpoint(f"{out}/model_final.pth")
    assert final["run"]["length"]["max_iter"] == chosen
    # a resumed run keeps the chosen length instead of measuring again
    assert final["iteration"] == chosen
    resumed = Trainer(before, resume=f"{out}/model_final.pth", log=lambda s: None)
    assert resumed.config.train.max_iter == chosen and resumed.budget is None


def test_patience_needs_periodic_evaluation(tiny_config):
    from retinanet.config import validate
    from retinanet.errors import ConfigError
    tiny_config.train.patience = 3
    with pytest.raises(ConfigError, match="train.patience"):
        validate(tiny_config)
