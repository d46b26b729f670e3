"""Weights by name, without network: torchvision's weights names resolve to the files torch.hub
caches in $TORCH_HOME/hub/checkpoints. The tests put generated state dicts (torchvision's own
models built with weights=None: the right keys and shapes) under the published file names in a
temporary TORCH_HOME and check that the real loading code finds, converts and checks them; a
download is served from memory (torch.hub's own code then checks the sha256 prefix of the name),
or refused as offline.

torch.hub checks a file's hash only while downloading it (a cached file is trusted), and a
generated file cannot carry the published prefix, so the hash check is exercised on a download.
"""
from __future__ import annotations

import email.message
import hashlib
import io
from urllib.error import URLError

import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

from retinanet.config import ModelConfig, load_config
from retinanet.errors import CheckpointError, ConfigError, MissingFileError
from retinanet.model import build_model
from retinanet.weights import (CLASSIFIER, convert_torchvision_state, download, load_model_weights,
                               unwrap_state_dict)

from conftest import REPO_ROOT

# the names torchvision's URLs give these files (name-<first sha256 digits>.pth)
FILES = {"ResNet18_Weights.IMAGENET1K_V1": "resnet18-f37072fd.pth",
         "RetinaNet_ResNet50_FPN_Weights.COCO_V1": "retinanet_resnet50_fpn_coco-eeacb38b.pth",
         "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1": "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth"}
CONFIGS = {"v1": REPO_ROOT / "configs/torchvision/retinanet_resnet50_fpn.yaml",
           "v2": REPO_ROOT / "configs/torchvision/retinanet_resnet50_fpn_v2.yaml"}


class _Response(io.BytesIO):
    """What urlopen returns, serving `data`."""

    def info(self):
        meta = email.message.Message()
        meta["Content-Length"] = str(len(self.getvalue()))
        return meta


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A hub cache holding a generated file under each published name: {name: state dict}."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("torch_home") / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    resnet = resnet18(weights=None)
    torch.nn.init.normal_(resnet.bn1.running_mean)  # recognisable statistics
    states = {"ResNet18_Weights.IMAGENET1K_V1": resnet.state_dict()}
    for name, build in (("RetinaNet_ResNet50_FPN_Weights.COCO_V1", retinanet_resnet50_fpn),
                        ("RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1", retinanet_resnet50_fpn_v2)):
        states[name] = build(weights=None, weights_backbone=None, num_classes=91).state_dict()
    for name, state in states.items():
        torch.save(state, folder / FILES[name])
    return folder, states


@pytest.fixture
def offline(monkeypatch):
    """No network: urlopen raises as it does without a connection."""
    def refuse(request, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "urlopen", refuse)


@pytest.fixture
def torch_home(cache, monkeypatch, offline):
    folder, states = cache
    monkeypatch.setenv("TORCH_HOME", str(folder.parent.parent))
    return states


def _tiny(depth: int = 18) -> ModelConfig:
    cfg = ModelConfig()
    cfg.backbone.depth, cfg.fpn.channels, cfg.head.num_convs = depth, 32, 1
    return cfg


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_backbone_weights_by_name_come_from_the_hub_cache(torch_home, name):
    cfg = _tiny()
    cfg.backbone.weights = name
    backbone = build_model(cfg, 3).backbone.state_dict()
    want = torch_home["ResNet18_Weights.IMAGENET1K_V1"]
    assert torch.equal(backbone["stem.0.weight"], want["conv1.weight"])
    assert torch.equal(backbone["stem.1.running_mean"], want["bn1.running_mean"])
    assert torch.equal(backbone["layer4.1.conv2.weight"], want["layer4.1.conv2.weight"])


def test_a_backbone_name_for_another_depth_is_a_config_error(torch_home):
    cfg = _tiny(depth=18)
    cfg.backbone.weights = "ResNet50_Weights.IMAGENET1K_V1"
    with pytest.raises(ConfigError, match=r"model\.backbone\.weights: ResNet50_Weights\.IMAGENET1K_V1 is a "
                                          r"ResNet50_Weights name, this takes ResNet18_Weights"):
        build_model(cfg, 3)
    cfg.backbone.weights = "IMAGENET1K_V7"
    with pytest.raises(ConfigError, match="neither an existing file .* nor a torchvision weights name"):
        build_model(cfg, 3)
    cfg.backbone.weights = "missing.pth"  # a path: read as it is, never looked up
    with pytest.raises(MissingFileError, match="backbone weights not found: missing.pth"):
        build_model(cfg, 3)


@pytest.mark.parametrize("arch, name", [("v1", "RetinaNet_ResNet50_FPN_Weights.COCO_V1"),
                                        ("v2", "RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1")])
def test_torchvision_coco_weights_by_name_are_converted_in_memory(torch_home, arch, name):
    model = build_model(load_config(CONFIGS[arch]).model, 91, load_backbone_weights=False)
    assert load_model_weights(model, name) == []
    want = convert_torchvision_state(torch_home[name], arch)
    ours = model.state_dict()
    assert want.keys() == {k for k in ours if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(ours[k], v) for k, v in want.items())


def test_coco_weights_need_their_architecture_except_for_the_classifier(torch_home):
    name = "RetinaNet_ResNet50_FPN_Weights.COCO_V1"
    v2 = build_model(load_config(CONFIGS["v2"]).model, 91, load_backbone_weights=False)
    for skip in (False, True):  # fine-tuning spares the classifier only
        with pytest.raises(CheckpointError, match=r"shape mismatch in \[.*'fpn\.p6\.weight'.*missing .*"
                                                  r"needs the architecture of configs/torchvision/"
                                                  r"retinanet_resnet50_fpn\.yaml"):
            load_model_weights(v2, name, skip_mismatched=skip)
    five = build_model(load_config(CONFIGS["v1"]).model, 5, load_backbone_weights=False)
    fresh = five.head.cls_score.weight.clone()
    with pytest.raises(CheckpointError, match=r"head\.cls_score\.weight has shape \(819, "):
        load_model_weights(five, name)
    assert load_model_weights(five, name, skip_mismatched=True) == list(CLASSIFIER)
    assert torch.equal(five.head.cls_score.weight, fresh)
    want = torch_home[name]["head.regression_head.bbox_reg.weight"]
    assert torch.equal(five.head.box_pred.weight, want)


def test_model_weights_take_retinanet_names_only(torch_home):
    model = build_model(_tiny(), 3, load_backbone_weights=False)
    with pytest.raises(ConfigError, match=r"ResNet18_Weights name, this takes RetinaNet_ResNet50_FPN_Weights"):
        load_model_weights(model, "ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(MissingFileError, match="weights not found: nowhere.pth"):
        load_model_weights(model, "nowhere.pth")


def test_offline_download_is_one_line_naming_url_file_and_folder(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = _tiny()
    cfg.backbone.weights = "IMAGENET1K_V1"
    with pytest.raises(MissingFileError) as error:
        build_model(cfg, 3)
    message = str(error.value)
    folder = tmp_path / "hub" / "checkpoints"
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert f"put it into {folder} as resnet18-f37072fd.pth" in message and "\n" not in message
    assert list(folder.iterdir()) == []  # no partial file left behind


def test_downloads_are_checked_against_the_hash_in_their_name(cache, tmp_path, monkeypatch):
    folder, _ = cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    data = (folder / FILES["ResNet18_Weights.IMAGENET1K_V1"]).read_bytes()  # not the published file
    monkeypatch.setattr(torch.hub, "urlopen", lambda request, *args, **kwargs: _Response(data))
    hub = tmp_path / "hub" / "checkpoints"
    with pytest.raises(CheckpointError, match=r"resnet18-f37072fd\.pth: the download is not the published "
                                              r"file \(invalid hash value"):
        download("https://download.pytorch.org/models/resnet18-f37072fd.pth")
    assert list(hub.iterdir()) == []
    prefix = hashlib.sha256(data).hexdigest()[:8]  # a name carrying this file's own hash
    state = download(f"https://example.invalid/models/resnet18-{prefix}.pth")
    assert (hub / f"resnet18-{prefix}.pth").read_bytes() == data
    assert torch.equal(state["conv1.weight"], torch.load(folder / FILES["ResNet18_Weights.IMAGENET1K_V1"])
                       ["conv1.weight"])


def test_state_dicts_are_unwrapped():
    state = {"w": torch.ones(1)}
    for wrapped in (state, {"model": state}, {"state_dict": state}, {"module.w": torch.ones(1)},
                    {"model": {"module.w": torch.ones(1)}}):
        assert unwrap_state_dict(wrapped).keys() == {"w"}
    with pytest.raises(CheckpointError, match="x.pth: not a state dict"):
        unwrap_state_dict({"model": {"w": "text"}}, "x.pth")
