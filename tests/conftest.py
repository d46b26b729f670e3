"""Shared fixtures: a small generated shapes dataset and a tiny demo-like config."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from retinanet.config import load_config  # noqa: E402
from retinanet.data.shapes import generate_shapes_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, num_train=24, num_val=8, image_size=128, seed=3)
    return out


def tiny_overrides(shapes_dir: Path, output_dir: Path) -> list[str]:
    """The demo config made small enough for a test: narrow, few iterations, no workers."""
    return [f"data.train.images={shapes_dir / 'train'}",
            f"data.train.annotations={shapes_dir / 'annotations' / 'instances_train.json'}",
            f"data.val.images={shapes_dir / 'val'}",
            f"data.val.annotations={shapes_dir / 'annotations' / 'instances_val.json'}",
            f"output_dir={output_dir}", "data.num_workers=0", "train.log_period=2",
            "model.fpn.channels=32", "model.head.num_convs=1", "model.head.gn_groups=8",
            "train.time_budget_s=0"]  # the demo's 10-minute budget would choose the length


@pytest.fixture(params=[True, False], ids=["channels_last", "contiguous"])
def channels_last(request) -> bool:
    """Both memory layouts the trainer can take (model.channels_last), for the tests whose
    arithmetic depends on it: exact resume, DDP equivalence, training end to end."""
    return request.param


@pytest.fixture
def tiny_config(shapes_dir, tmp_path):
    return load_config(REPO_ROOT / "configs" / "shapes_R18.yaml",
                       tiny_overrides(shapes_dir, tmp_path / "run") + ["train.max_iter=4"])


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory):
    """The demo config trained for 150 iterations on four images (flips on) and evaluated on the
    same images: a model that finds its objects, trained once for the tests that need one
    (test_train's overfit check, test_tta's AP check). Returns the images, annotations, run
    folder and the final evaluation's result."""
    from types import SimpleNamespace

    from retinanet.engine.trainer import Trainer

    root = tmp_path_factory.mktemp("overfit")
    generate_shapes_dataset(root / "few", num_train=4, num_val=1, image_size=128, min_size=12, seed=11)
    images, annotations = root / "few" / "train", root / "few" / "annotations" / "instances_train.json"
    cfg = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", [
        f"data.train.images={images}", f"data.train.annotations={annotations}",
        f"data.val.images={images}", f"data.val.annotations={annotations}",  # scored on its training images
        f"output_dir={root / 'run'}", "data.num_workers=0", "train.batch_size=4", "train.max_iter=150",
        "train.time_budget_s=0", "train.log_period=50", "train.optimizer.lr=0.001",
        "train.scheduler.warmup_iters=20", "eval.num_vis_images=0", "eval.pr_curves=false"])
    torch.manual_seed(0)
    result = Trainer(cfg, log=lambda s: None).train()
    return SimpleNamespace(images=images, annotations=annotations, run=root / "run", result=result)
