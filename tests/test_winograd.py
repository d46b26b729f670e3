import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from retinanet.model.fold import fold_batchnorm, fuse_frozen_batchnorm
from retinanet.model.winograd import WinogradConv2d, use_winograd, winograd_conv3x3

from numerics import U32, U64, assert_within, network_rtol, network_shape


def winograd_error_bound(x: torch.Tensor, weight: torch.Tensor, bias, unit: float) -> float:
    """Worst-case |winograd_conv3x3 - conv2d| with unit roundoff `unit` (Higham's gamma_n: n
    roundings of a sum's magnitude). B^T d B adds 4 inputs (|.| <= 4 max|x|), G g G^T 9 weights
    with coefficients <= 1/4 (|.| <= 2.25 max|w|), the bmm sums C products and A^T m A 9 of them:
    a magnitude of 81 C max|x| max|w| rounded C + 8 times. The direct convolution's own rounding
    (9C roundings of 9C max|x| max|w|) and the inputs' rounding to float32 fit in one more 81 C;
    the bias add rounds once on each side."""
    channels = x.shape[1]
    magnitude = 81 * channels * x.abs().max().item() * weight.abs().max().item()
    return (channels + 9) * unit * magnitude + 2 * unit * (0.0 if bias is None else bias.abs().max().item())


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 7, 5), (1, 8, 8, 8), (2, 4, 13, 4), (1, 16, 6, 11)])
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_equals_direct_convolution(shape, bias):
    """Any height and width (odd ones padded to whole 2 x 2 tiles and cropped), with and without
    bias: the algebra to float64 rounding, and float32 (channels_last input) to float32 rounding,
    both within the worst-case bound of winograd_error_bound (an algebra or layout mistake is
    O(1) of max|x| max|w|)."""
    batch, channels, height, width = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    weight = torch.randn(6, channels, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64) if bias else None
    want = F.conv2d(x, weight, b, padding=1)
    got = winograd_conv3x3(x, weight, b)
    assert got.shape == want.shape == (batch, 6, height, width)
    assert (got - want).abs().max().item() <= winograd_error_bound(x, weight, b, U64)
    got32 = winograd_conv3x3(x.float().contiguous(memory_format=torch.channels_last), weight.float(),
                             None if b is None else b.float())
    assert (got32.double() - want).abs().max().item() <= winograd_error_bound(x, weight, b, U32)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),   # converted
                         nn.Conv2d(8, 8, 3, stride=2, padding=1),      # strided: kept
                         nn.Conv2d(8, 8, 1),                           # 1 x 1: kept
                         nn.Conv2d(8, 8, 3, padding=1, bias=False),    # converted
                         nn.Conv2d(8, 8, 3, padding=2, dilation=2))    # dilated: kept


def test_use_winograd_converts_3x3_stride_1_convolutions_and_leaves_eager_results_alone():
    net, reference = _net(), _net()
    x = torch.randn(2, 3, 9, 10)
    net = use_winograd(net)  # a new module: count what it converted
    assert sum(type(m) is WinogradConv2d for m in net.modules()) == 2
    assert [type(m) is WinogradConv2d for m in net if isinstance(m, nn.Conv2d)] == [True, False, False, True, False]
    assert net.state_dict().keys() == reference.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))  # eagerly: nn.Conv2d, bit for bit


def test_compiled_graph_computes_by_winograd():
    """Under torch.compile the converted convolutions become Winograd's batched matrix products
    (the graph dynamo hands to the backend holds bmm, and convolution only for those kept)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    net, reference = _net(), _net().double()
    net = use_winograd(net)
    x = torch.randn(2, 3, 9, 10)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(net, backend=backend)(x)
        want = reference(x.double())
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert sum("bmm" in t for t in targets) == 2
    assert sum("conv2d" in t for t in targets) == 3
    # float32, two convolutions by Winograd, against the direct network in float64: rounding only
    assert_within(got, want, network_rtol(*network_shape(reference)), "output")


def test_module_transforms_return_new_modules_and_leave_theirs_alone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), FrozenBatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
    fused = fuse_frozen_batchnorm(net)
    pairs = [(net, copy.deepcopy(net)), (fused, copy.deepcopy(fused))]
    for transform in (use_winograd, fuse_frozen_batchnorm, fold_batchnorm):
        for module, original in pairs:
            new = transform(module)
            assert not any(a is b for a, b in zip(new.modules(), module.modules()))
            assert [type(m) for m in module.modules()] == [type(m) for m in original.modules()]
            assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(),
                                                         original.state_dict().values()))
    assert type(fold_batchnorm(fused)[0]) is nn.Conv2d and type(use_winograd(net)[0]) is WinogradConv2d
