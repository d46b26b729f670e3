import math

import torch

from retinanet.model import AnchorGenerator


def make(**kw):
    args = dict(sizes=[32, 64, 128, 256, 512], octave_scales=[1, 2 ** (1 / 3), 2 ** (2 / 3)],
                aspect_ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])
    args.update(kw)
    return AnchorGenerator(**args)


def sizes_for(h, w):
    return [(math.ceil(h / s), math.ceil(w / s)) for s in (8, 16, 32, 64, 128)]


def test_count_and_order():
    gen = make()
    feats = sizes_for(256, 384)
    anchors = gen(feats, torch.device("cpu"))
    assert gen.num_anchors == 9
    assert anchors.shape == (sum(h * w for h, w in feats) * 9, 4)
    assert gen.num_anchors_per_level(feats) == [h * w * 9 for h, w in feats]
    # First location of P3: 9 anchors centred at (0, 0); the next location is one stride right.
    first = anchors[:9]
    assert torch.allclose((first[:, :2] + first[:, 2:]) / 2, torch.zeros(9, 2))
    second = anchors[9:18]
    assert torch.allclose((second[:, 0] + second[:, 2]) / 2, torch.full((9,), 8.0))


def test_areas_and_ratios():
    gen = make()
    base = gen(sizes_for(128, 128), torch.device("cpu"))[:9]
    w, h = base[:, 2] - base[:, 0], base[:, 3] - base[:, 1]
    scales = torch.tensor([32 * 2 ** (i / 3) for i in range(3)])
    # ratio-major order: ratios (0.5, 1, 2) each with the three scales; a few roundings each
    # side (sizes times sqrt of the ratio, halved, subtracted, multiplied, sqrt): ~6 u, rtol 168 u
    assert torch.allclose((w * h).sqrt(), scales.repeat(3), rtol=1e-5)
    assert torch.allclose(h / w, torch.tensor([0.5, 1.0, 2.0]).repeat_interleave(3), rtol=1e-5)


def test_offset_and_rounding():
    gen = make(offset=0.5, round_base=True)
    anchors = gen(sizes_for(128, 128), torch.device("cpu"))
    assert torch.allclose((anchors[0, :2] + anchors[0, 2:]) / 2, torch.tensor([4.0, 4.0]))
    base = gen.base_anchors[0]
    assert torch.equal(base, base.round())


def test_cached_per_size():
    gen = make()
    a = gen(sizes_for(128, 128), torch.device("cpu"))
    assert gen(sizes_for(128, 128), torch.device("cpu")) is a
    b = gen(sizes_for(256, 128), torch.device("cpu"))
    assert b is not a and b.shape[0] > a.shape[0]
