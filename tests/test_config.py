import subprocess
import sys

import pytest
import yaml

from retinanet.config import Config, ConfigError, load_config, save_config

from conftest import REPO_ROOT


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"batch_size": 8, "optimizer": {"lr": 0.02}},
                                   "model": {"fpn": {"channels": 128}}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "train": {"batch_size": 4}})
    cfg = load_config(child, ["train.optimizer.type=adamw", "model.anchors.sizes=[8,16,32,64,128]"])
    assert cfg.train.batch_size == 4  # child wins
    assert cfg.train.optimizer.lr == 0.02  # merged from base, not replaced
    assert cfg.model.fpn.channels == 128
    assert cfg.train.optimizer.type == "adamw"
    assert cfg.model.anchors.sizes == [8.0, 16.0, 32.0, 64.0, 128.0]
    assert cfg.train.max_iter == Config().train.max_iter  # untouched default


def test_unknown_key_names_key_and_closest(tmp_path):
    path = write(tmp_path / "c.yaml", {"train": {"batch_sise": 2}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.batch_sise' \(did you mean 'train.batch_size'\?\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'train.lr'.*did you mean 'train.optimizer.lr'"):
        load_config(write(tmp_path / "d.yaml", {}), ["train.lr=0.1"])


@pytest.mark.parametrize("override, fragment", [
    ("train.max_iter=ten", "train.max_iter: expected an integer"),
    ("train.max_iter=1.5", "train.max_iter: expected an integer"),
    ("train.amp=3", "train.amp: expected true or false"),
    ("model.backbone.depth=19", "model.backbone.depth: 19 is not one of 18, 34, 50, 101"),
    ("model.backbone.norm=forzen_bn", "did you mean 'frozen_bn'"),
    ("data.min_size=800", "data.min_size: expected a list"),
    ("train=3", "train: expected a mapping"),
])
def test_wrong_types_are_one_line_errors(tmp_path, override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "c.yaml", {}), [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("train.optimizer.lr=-1", "train.optimizer.lr"),
    ("model.matcher.bg_iou=0.6", "model.matcher.bg_iou"),
    ("model.anchors.sizes=[1,2]", "model.anchors.sizes"),
    ("model.anchors.level_sizes=[[32,40],[64],[1],[2],[3]]", "model.anchors.level_sizes"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("data.label_map=ids", "data.label_map"),
    ("loss.cls.kernel=cuda", "loss.cls.kernel"),
])
def test_bad_values_are_rejected(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path / "c.yaml", {}), [override])


def test_focal_kernel_reaches_the_loss_and_only_applies_to_focal_and_bce(tmp_path):
    from retinanet.losses import build_criterion
    cfg = load_config(write(tmp_path / "c.yaml", {}), ["loss.cls.kernel=compile"])
    assert build_criterion(cfg, 3).cls_loss.kernel == "compile"
    # the device picks the matcher's and box loss's forms once (sync-free ones off the CPU)
    for device, dense in (("cpu", False), ("cuda", True)):
        crit = build_criterion(cfg, 3, device=device)
        assert (crit._positive_box_loss == crit._dense_box_loss) is dense
        assert (crit.matcher._add_low_quality == crit.matcher._low_quality_dense) is dense
    with pytest.raises(ConfigError, match="loss.cls.kernel"):
        load_config(write(tmp_path / "c.yaml", {}), ["loss.cls.type=ghm", "loss.cls.kernel=eager"])


def test_int_is_accepted_for_float_and_null_for_optional(tmp_path):
    cfg = load_config(write(tmp_path / "c.yaml", {"train": {"optimizer": {"lr": 1}}}),
                      ["loss.cls.alpha=null", "train.clip_grad_norm=10"])
    assert cfg.train.optimizer.lr == 1.0 and isinstance(cfg.train.optimizer.lr, float)
    assert cfg.loss.cls.alpha is None
    assert cfg.train.clip_grad_norm == 10.0


def test_exponent_notation_without_dot_is_a_number(tmp_path):
    # YAML 1.1 reads 1e-4 (no dot) as a string; it must still be accepted for float keys
    cfg = load_config(write(tmp_path / "c.yaml", {}), ["train.optimizer.lr=1e-3"])
    assert cfg.train.optimizer.lr == 1e-3
    (tmp_path / "w.yaml").write_text("train:\n  optimizer:\n    weight_decay: 1e-4\n")
    assert load_config(tmp_path / "w.yaml").train.optimizer.weight_decay == 1e-4
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(write(tmp_path / "c.yaml", {}), ["train.optimizer.lr=fast"])


def test_missing_file_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "shapes_R18.yaml", ["train.max_iter=7"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


@pytest.mark.parametrize("name", ["shapes_R18.yaml", "retinanet_R50_FPN_1x_coco.yaml",
                                  "retinanet_R50_FPN_3x_coco.yaml", "retinanet_R101_FPN_1x_coco.yaml",
                                  "retinanet_R101_FPN_3x_coco.yaml", "retinanet_R50_FPN_v2style_3x_coco.yaml",
                                  "torchvision/retinanet_resnet50_fpn.yaml",
                                  "torchvision/retinanet_resnet50_fpn_v2.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO_ROOT / "configs" / name)
    assert cfg.model.backbone.depth in (18, 50, 101)


def test_published_1x_recipe():
    cfg = load_config(REPO_ROOT / "configs" / "retinanet_R50_FPN_1x_coco.yaml")
    t = cfg.train
    assert (t.batch_size, t.max_iter, t.optimizer.lr) == (16, 90000, 0.01)
    assert t.scheduler.steps == [60000, 80000] and t.scheduler.warmup_iters == 1000
    assert (cfg.data.min_size, cfg.data.max_size) == ([800], 1333)


def test_cli_config_error_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "tools/train.py", "--config", "configs/shapes_R18.yaml",
                           "train.batch_sise=2"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "train.batch_sise" in proc.stderr and "train.batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr
