"""Model EMA: the update rule with its warm-up, BatchNorm buffers, and continuing after a reload."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from retinanet.engine.ema import ModelEMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _step(model: nn.Module, seed: int) -> None:
    """A stand-in for an optimiser step and a training forward: new weights and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    dtype = next(model.parameters()).dtype
    model.train()(torch.randn(2, 3, 8, 8, generator=g, dtype=dtype))  # moves the running statistics


def test_update_rule_with_warm_up_in_float64():
    model = _model().double()
    ema = ModelEMA(model, decay=0.99)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 31):
        _step(model, n)
        ema.update(model)
        d = min(0.99, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    assert ema.decay_at(1) == pytest.approx(2 / 11) and ema.decay_at(10_000) == 0.99
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            # lerp computes e + w (m - e), the reference d e + (1 - d) m: the same real number,
            # float64 roundings apart (30 updates, values of order 10)
            torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-12)
        else:  # BatchNorm's step counter is copied
            assert torch.equal(v, expected[k]), k
    assert int(ema.module[1].num_batches_tracked) == 30
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_early_updates_follow_the_model_late_ones_average():
    model = _model()
    ema = ModelEMA(model, decay=0.999)
    _step(model, 1)
    ema.update(model)
    # d_1 = 2/11: after one step the average is mostly the new weights, not the initialisation
    weight = model[0].weight.detach()
    assert (ema.module[0].weight - weight).abs().max() < (weight - _model()[0].weight).abs().max() * 0.2


def test_reload_continues_the_same_average_bit_for_bit():
    model, other = _model(), _model()
    ema = ModelEMA(model, decay=0.9)
    for n in range(5):
        _step(model, n)
        ema.update(model)
    # "resume": a fresh EMA gets the saved weights and counters, the model its raw weights
    other.load_state_dict(model.state_dict())
    resumed = ModelEMA(other, decay=0.9)
    resumed.module.load_state_dict(ema.module.state_dict())
    resumed.load_state_dict(ema.state_dict())
    for n in range(5, 9):
        _step(model, n)
        ema.update(model)
        _step(other, n)
        resumed.update(other)
    for (k, a), b in zip(ema.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(_model(), decay=1.0)
