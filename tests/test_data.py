import json

import numpy as np
import pytest
import torch
from PIL import Image

from retinanet.data import CocoDetection, Collate, DetectionTransform, pad_images


def write_coco(tmp_path, images, annotations, categories):
    (tmp_path / "img").mkdir(exist_ok=True)
    for img in images:
        Image.fromarray(np.full((img["height"], img["width"], 3), 127, np.uint8)).save(
            tmp_path / "img" / img["file_name"])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images,
                                "annotations": annotations, "categories": categories}))
    return tmp_path / "img", path


def ann(i, image_id, cat, bbox, crowd=0):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": crowd}


@pytest.fixture
def sparse_dataset(tmp_path):
    images = [{"id": 10, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 20, "file_name": "b.png", "width": 32, "height": 32}]
    anns = [ann(1, 10, 90, [4, 4, 10, 10]), ann(2, 10, 3, [20, 5, 30, 60]),  # 2nd clipped to h=48
            ann(3, 10, 3, [0, 0, 10, 10], crowd=1), ann(4, 10, 90, [5, 5, 0, 3])]  # crowd, zero-width
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 3, "name": "car"}]
    return write_coco(tmp_path, images, anns, cats)


def test_sparse_category_ids_crowd_and_negatives(sparse_dataset):
    ds = CocoDetection(*sparse_dataset)
    assert ds.class_names == ["car", "toothbrush"]
    assert ds.label_to_cat_id == {0: 3, 1: 90} and ds.cat_id_to_label == {3: 0, 90: 1}
    assert len(ds) == 2  # the image without annotations stays, as a negative
    sample = ds[0]
    assert sample["image"].shape == (48, 64, 3) and sample["image"].dtype == np.uint8
    assert sample["labels"].tolist() == [1, 0]  # crowd and zero-width annotations excluded
    assert np.allclose(sample["boxes"], [[4, 4, 14, 14], [20, 5, 50, 48]])
    assert ds[1]["boxes"].shape == (0, 4)
    assert ds.report_dropped() == 1


def test_missing_image_error_names_file(sparse_dataset):
    images_dir, ann_path = sparse_dataset
    (images_dir / "b.png").unlink()
    ds = CocoDetection(images_dir, ann_path)
    with pytest.raises(FileNotFoundError, match=r"b\.png.*image id 20"):
        ds[1]


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_transform_resizes_flips_clips_and_keeps_labels():
    t = DetectionTransform(min_sizes=[100], max_size=150, mean=[0, 0, 0], std=[1, 1, 1], hflip_prob=1.0)
    image = np.zeros((50, 100, 3), np.uint8)
    out = t({"image": image, "boxes": np.array([[0, 0, 10, 20], [90, 10, 100.4, 50]], np.float32),
             "labels": np.array([4, 7]), "image_id": 1, "orig_size": (50, 100)})
    # shortest side 50 -> 100 would make the longest 200 > 150, so scale = 1.5
    assert out["image"].shape == (3, 75, 150) and out["image_size"] == (75, 150)
    assert out["labels"].tolist() == [4, 7]
    assert torch.allclose(out["boxes"], torch.tensor([[135.0, 0, 150, 30], [0, 15, 15, 75]]), atol=1e-3)


def test_transform_empty_boxes_and_normalisation():
    t = DetectionTransform(min_sizes=[32], max_size=32, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    out = t({"image": np.full((32, 32, 3), 255, np.uint8), "boxes": np.zeros((0, 4), np.float32),
             "labels": np.zeros(0, np.int64), "image_id": 1, "orig_size": (32, 32)})
    assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
    assert torch.allclose(out["image"], torch.ones(3, 32, 32))


def test_multiscale_draws_from_min_sizes():
    t = DetectionTransform(min_sizes=[32, 48, 64], max_size=1000, mean=[0] * 3, std=[1] * 3)
    sizes = {t({"image": np.zeros((16, 16, 3), np.uint8), "boxes": np.zeros((0, 4)),
                "labels": np.zeros(0), "image_id": 0, "orig_size": (16, 16)})["image_size"][0]
             for _ in range(40)}
    assert sizes == {32, 48, 64}


def test_collate_pads_to_multiple_of_128():
    samples = [{"image": torch.ones(3, 100, 130), "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.long), "image_id": 1, "orig_size": (50, 65),
                "image_size": (100, 130)},
               {"image": torch.ones(3, 129, 20), "boxes": torch.tensor([[0.0, 0, 5, 5]]),
                "labels": torch.tensor([2]), "image_id": 2, "orig_size": (129, 20),
                "image_size": (129, 20)}]
    batch = Collate(128)(samples)
    assert batch.images.shape == (2, 3, 256, 256)
    assert batch.images[0, :, :100, :130].eq(1).all() and batch.images[0, :, 100:].eq(0).all()
    assert batch.image_ids == [1, 2] and batch.image_sizes == [(100, 130), (129, 20)]
    assert batch.labels[1].tolist() == [2] and batch.boxes[0].shape == (0, 4)
    assert pad_images([torch.ones(3, 10, 10)], 1).shape == (1, 3, 10, 10)


def test_transform_clips_round_off_and_rejects_boxes_outside():
    t = DetectionTransform(min_sizes=[100], max_size=100, mean=[0] * 3, std=[1] * 3)
    sample = {"image": np.zeros((100, 100, 3), np.uint8), "labels": np.array([1, 2]),
              "image_id": 9, "orig_size": (100, 100)}
    out = t({**sample, "boxes": np.array([[10, 10, 50, 40], [90, 20, 100.00001, 30]], np.float32)})
    assert out["boxes"][1, 2] == 100 and out["labels"].tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"image 9: box .* is under 0.01 px wide or high inside the 100x100 image"):
        t({**sample, "boxes": np.array([[10, 10, 50, 40], [100, 20, 110, 30]], np.float32)})


def test_train_pipeline_is_seeded():
    t = DetectionTransform(min_sizes=[32, 48, 64, 80], max_size=1000, mean=[0] * 3, std=[1] * 3,
                           hflip_prob=0.5)
    sample = {"image": np.zeros((16, 16, 3), np.uint8), "boxes": np.array([[0, 0, 4, 4]], np.float32),
              "labels": np.array([0]), "image_id": 0, "orig_size": (16, 16)}

    def draws(seed):
        t.set_seed(seed)
        return [(t(sample)["image_size"], t(sample)["boxes"][0, 0].item()) for _ in range(12)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_aspect_ratio_grouped_stream_shards_and_resumes():
    from retinanet.data.loader import InfiniteSampler
    groups = [i % 3 == 0 for i in range(50)]  # 17 portrait, 33 landscape
    take = lambda sampler, n: [next(it) for it in [iter(sampler)] for _ in range(n)]  # noqa: E731
    single = take(InfiniteSampler(50, 7, batch_size=6, group_ids=groups), 120)  # over 2 epochs
    for start in range(0, 120, 6):  # every global batch is of one group
        assert len({groups[i] for i, _ in single[start:start + 6]}) == 1
    assert [p for _, p in single] == list(range(120))
    # 2 ranks x batch 3 see the same global batches, each rank its half
    ranks = [take(InfiniteSampler(50, 7, rank=r, world_size=2, batch_size=3, group_ids=groups), 60)
             for r in (0, 1)]
    merged = sorted(ranks[0] + ranks[1], key=lambda pair: pair[1])
    assert merged == single
    # a resumed stream continues exactly
    assert take(InfiniteSampler(50, 7, start=42, batch_size=6, group_ids=groups), 30) == single[42:72]
    # without grouping every index appears once per epoch
    plain = take(InfiniteSampler(50, 7, batch_size=6), 50)
    assert sorted(i for i, _ in plain) == list(range(50))
