"""Starting from other weights: model.weights with another class count, and torchvision's
label convention (data.label_map: category_id) through dataset, evaluator and Detector."""
import pytest
import torch

from retinanet import Detector
from retinanet.data import CocoDetection
from retinanet.engine.checkpoint import load_model_weights
from retinanet.engine.evaluator import Evaluator
from retinanet.engine.trainer import Trainer
from retinanet.model import build_model


def test_finetune_from_weights_with_another_class_count(tiny_config, tmp_path):
    source = build_model(tiny_config.model, 7, load_backbone_weights=False)
    torch.nn.init.normal_(source.fpn.p6.weight)  # recognisable values
    path = tmp_path / "seven_classes.pth"
    torch.save({"model": source.state_dict()}, path)
    tiny_config.model.weights = str(path)
    tiny_config.data.val.annotations = ""
    logs = []
    trainer = Trainer(tiny_config, log=logs.append)  # the shapes dataset has 5 classes
    assert trainer.model.num_classes == 5
    assert torch.equal(trainer.model.fpn.p6.weight.cpu(), source.fpn.p6.weight)
    assert torch.equal(trainer.model.head.box_pred.weight.cpu(), source.head.box_pred.weight)
    line = next(line for line in logs if line.startswith("initialised from"))
    assert "re-initialised (shape differs): head.cls_score.weight, head.cls_score.bias" in line


def test_mismatched_weights_are_an_error_unless_fine_tuning(tiny_config, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(build_model(tiny_config.model, 7, load_backbone_weights=False).state_dict(), path)
    model = build_model(tiny_config.model, 5, load_backbone_weights=False)
    with pytest.raises(ValueError, match=r"w\.pth: head\.cls_score\.weight has shape \(21, "):
        load_model_weights(model, path)
    assert load_model_weights(model, path, skip_mismatched=True) == ["head.cls_score.weight",
                                                                      "head.cls_score.bias"]
    state = build_model(tiny_config.model, 5, load_backbone_weights=False).state_dict()
    del state["fpn.p7.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['fpn\.p7\.weight'\]"):
        load_model_weights(model, path, skip_mismatched=True)


def test_category_id_label_map(shapes_dir, tmp_path):
    annotations = shapes_dir / "annotations" / "instances_val.json"
    contiguous = CocoDetection(shapes_dir / "val", annotations)
    by_id = CocoDetection(shapes_dir / "val", annotations, label_map="category_id")
    assert by_id.num_classes == max(contiguous.cat_ids) + 1
    assert by_id.class_names[0] == "N/A"
    assert [by_id.class_names[c] for c in contiguous.cat_ids] == contiguous.class_names
    image_id = contiguous.image_ids[0]
    assert [contiguous.cat_ids[k] for k in contiguous.targets(image_id)[1]] == \
        by_id.targets(image_id)[1].tolist()

    # label 0 ("N/A") cannot be scored: left out of the results, and said so
    def predict(batch):
        out = []
        for i in batch.image_ids:
            boxes, labels = by_id.targets(i)
            out.append({"boxes": torch.as_tensor(boxes).repeat(2, 1),
                        "scores": torch.tensor([0.9] * len(labels) + [0.95] * len(labels)),
                        "labels": torch.cat([torch.as_tensor(labels), torch.zeros(len(labels), dtype=torch.long)])})
        return out

    class Batch:
        image_ids = by_id.image_ids

    logs = []
    result = Evaluator(by_id, [Batch()], output_dir=tmp_path)(predict, log=logs.append)
    assert result["metrics"]["AP"] == pytest.approx(1.0)
    num_boxes = sum(len(by_id.targets(i)[1]) for i in by_id.image_ids)
    assert any(f"{num_boxes} of {2 * num_boxes} detections have a label that is no category" in line
               for line in logs)


def test_detector_category_ids_follow_the_label_map(tiny_config, tmp_path):
    tiny_config.data.label_map = "category_id"
    model = build_model(tiny_config.model, 6, load_backbone_weights=False)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    detector = Detector.from_config(tiny_config, weights=path)
    assert detector.class_names[0] == "N/A" and len(detector.class_names) == 6
    assert detector.label_to_cat_id == {c: c for c in range(1, 6)}
    assert detector._cat_id_lookup.tolist() == [-1, 1, 2, 3, 4, 5]
