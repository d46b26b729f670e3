"""Training end to end: overfitting a few images, and the command-line tools on a tiny run."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from retinanet.config import load_config
from retinanet.engine.checkpoint import load_checkpoint
from retinanet.engine.building import lr_factor
from retinanet.engine.trainer import Trainer

from conftest import REPO_ROOT, tiny_overrides


def test_overfit_a_few_images(overfit_run):
    """150 iterations on four images, scored on the same images (conftest's overfit_run)."""
    assert overfit_run.result["metrics"]["AP50"] > 0.9, overfit_run.result["metrics"]


def test_lr_schedule_warmup_multistep_and_cosine(tiny_config):
    cfg = tiny_config
    cfg.train.max_iter, cfg.train.scheduler.warmup_iters, cfg.train.scheduler.warmup_factor = 100, 10, 0.1
    cfg.train.scheduler.type, cfg.train.scheduler.steps = "multistep", [50, 80]
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 5) == pytest.approx(0.55)
    assert [lr_factor(cfg, i) for i in (10, 49, 50, 80)] == pytest.approx([1, 1, 0.1, 0.01])
    cfg.train.scheduler.type, cfg.train.scheduler.min_lr_factor = "cosine", 0.0
    assert lr_factor(cfg, 55) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(0.55 * torch.pi)).item()))
    assert lr_factor(cfg, 100) == pytest.approx(0.0, abs=1e-9)


def test_resume_continues_where_it_stopped(tiny_config, channels_last):
    cfg = tiny_config
    cfg.model.channels_last = channels_last
    cfg.train.checkpoint_period, cfg.eval.num_vis_images = 2, 0
    cfg.data.val.annotations = ""  # no evaluation needed here
    Trainer(cfg, log=lambda s: None).train()
    out = cfg.output_dir
    state = load_checkpoint(f"{out}/model_0000002.pth")
    assert state["iteration"] == 2
    logs = []
    resumed = Trainer(load_config(f"{out}/config.yaml"), resume=f"{out}/model_0000002.pth", log=logs.append)
    assert resumed.iteration == 2
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(
        cfg.train.optimizer.lr * lr_factor(cfg, 2))
    resumed.train()
    assert any("resumed from" in line for line in logs)
    assert load_checkpoint(f"{out}/model_final.pth")["iteration"] == 4


def test_train_and_val_categories_must_agree(tiny_config, tmp_path):
    ann = json.loads(open(tiny_config.data.val.annotations).read())
    ann["categories"] = ann["categories"][:4]
    ann["annotations"] = [a for a in ann["annotations"] if a["category_id"] <= 4]
    (tmp_path / "val.json").write_text(json.dumps(ann))
    tiny_config.data.val.annotations = str(tmp_path / "val.json")
    with pytest.raises(ValueError, match="different categories"):
        Trainer(tiny_config, log=lambda s: None)


def test_eval_period_needs_a_validation_set(tiny_config):
    tiny_config.data.val.annotations, tiny_config.train.eval_period = "", 2
    with pytest.raises(ValueError, match="train.eval_period"):
        Trainer(tiny_config, log=lambda s: None)


def run_tool(*args):
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_train_and_eval_tools_end_to_end(shapes_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(shapes_dir, run_dir) + ["train.max_iter=6", "eval.num_vis_images=2",
                                                       "model.postprocess.score_thresh=0.0"]
    stdout = run_tool("tools/train.py", "--config", "configs/shapes_R18.yaml", *overrides)
    assert "iter      6/6" in stdout and "COCO bbox evaluation" in stdout
    assert (run_dir / "model_final.pth").is_file() and (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").model.num_classes == 5  # derived from the dataset
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((run_dir / "vis").glob("*.png"))) == 2

    eval_dir = tmp_path / "eval"
    stdout = run_tool("tools/eval.py", "--config", str(run_dir / "config.yaml"),
                      "--weights", str(run_dir / "model_final.pth"), "--output", str(eval_dir))
    assert "Average Precision" in stdout and "circle" in stdout
    results = json.loads((eval_dir / "coco_results.json").read_text())
    val = json.loads((shapes_dir / "annotations" / "instances_val.json").read_text())
    assert results, "score_thresh 0 must give detections"
    assert {r["image_id"] for r in results} <= {img["id"] for img in val["images"]}
    assert {r["category_id"] for r in results} <= {c["id"] for c in val["categories"]}
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 and r["bbox"][3] >= 0 for r in results)
    metrics = json.loads((eval_dir / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert all(-1 <= v <= 1 for v in metrics.values())
    # the same weights give the same AP in training's final eval and in tools/eval.py
    final = json.loads((run_dir / "eval" / "metrics.json").read_text())["metrics"]
    assert final["AP"] == pytest.approx(metrics["AP"])


def test_eval_tool_missing_weights_is_one_line(shapes_dir, tmp_path):
    proc = subprocess.run([sys.executable, "tools/eval.py", "--config", "configs/shapes_R18.yaml",
                           "--weights", str(tmp_path / "none.pth"), *tiny_overrides(shapes_dir, tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "none.pth" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP training needs CUDA")
def test_amp_training_step_on_cuda(tiny_config):
    cfg = tiny_config
    cfg.train.amp, cfg.train.device, cfg.data.val.annotations = True, "cuda", ""
    trainer = Trainer(cfg, log=lambda s: None)
    assert trainer.use_amp
    trainer.train()
    state = load_checkpoint(f"{cfg.output_dir}/model_final.pth")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_the_trainer_leaves_the_callers_config_alone(tiny_config):
    """num_classes is resolved in the trainer's own copy (and the run's config.yaml), not
    written into the object the caller passed."""
    tiny_config.data.val.annotations = ""
    before = copy.deepcopy(tiny_config)
    trainer = Trainer(tiny_config, log=lambda s: None)
    assert tiny_config == before and tiny_config.model.num_classes is None
    assert trainer.config.model.num_classes == 5
    assert load_config(f"{tiny_config.output_dir}/config.yaml").model.num_classes == 5


def test_the_rank_reduction_of_the_positive_count_applies_in_training_only(tiny_config):
    from retinanet.losses import build_criterion
    calls = []
    criterion = build_criterion(tiny_config, 3, reduce_num_fg=lambda n: calls.append(n) or n * 0.5)
    anchors = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]])
    # both anchors are positives (IoU 1): num_fg 2, which the stand-in reduction halves
    args = (torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), anchors, [anchors.clone()], [torch.tensor([1, 2])])
    trained = criterion(*args)
    assert len(calls) == 1 and float(calls[0]) == 2
    criterion.eval()  # validation: ranks run different numbers of batches, no collective
    evaluated = criterion(*args)
    assert len(calls) == 1
    assert float(evaluated["loss_cls"]) > 0
    torch.testing.assert_close(trained["loss_cls"], 2 * evaluated["loss_cls"], rtol=0, atol=0)
