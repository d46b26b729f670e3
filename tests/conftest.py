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
