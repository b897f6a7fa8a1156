"""fastconv.Conv2d is a drop-in nn.Conv2d: same constructor, parameters, state_dict, forward, backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastconv

from .helpers import assert_close


pytestmark = pytest.mark.usefixtures("triton_backend")


def test_is_nn_conv2d_with_same_state_dict():
    ref = nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=1, bias=True, padding_mode="zeros")
    ours = fastconv.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=1, groups=1, bias=True,
                           padding_mode="zeros", device="cpu", dtype=torch.float32)
    assert isinstance(ours, nn.Conv2d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]
    ours.load_state_dict(ref.state_dict())  # an nn.Conv2d checkpoint loads into fastconv.Conv2d
    ref.load_state_dict(ours.state_dict())  # and back
    assert "algo=implicit" in repr(ours)


def _small_net(conv_cls, **kw):
    torch.manual_seed(0)
    return nn.Sequential(
        conv_cls(3, 12, 3, padding=1, **kw), nn.ReLU(), conv_cls(12, 20, 3, stride=2, padding="valid", **kw),
        nn.ReLU(), conv_cls(20, 20, 3, padding="same", groups=4, bias=False, **kw), nn.Flatten(), nn.LazyLinear(5),
    )


@pytest.mark.parametrize("algo", ["implicit", "im2col"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_drop_in_model_forward_backward(algo, channels_last, device):
    ref = _small_net(nn.Conv2d).double().to(device)
    ours = _small_net(fastconv.Conv2d, algo=algo).double().to(device)
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref(x)  # materialise the lazy layer, then copy every parameter across
    ours(x)
    ours.load_state_dict(ref.state_dict())
    y_ref, y = ref(x), ours(x)
    assert_close(y, y_ref, torch.float64, "model forward")
    y_ref.square().sum().backward()
    y.square().sum().backward()
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        assert_close(p.grad, p_ref.grad, torch.float64, f"grad of {name}")


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode, device):
    ref = nn.Conv2d(2, 4, 3, padding=1, padding_mode=mode).double().to(device)
    ours = fastconv.Conv2d(2, 4, 3, padding=1, padding_mode=mode).double().to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64, device=device)
    assert_close(ours(x), ref(x), torch.float64, f"padding_mode={mode}")


def test_from_conv_shares_parameters():
    conv = nn.Conv2d(3, 4, 3)
    fc = fastconv.Conv2d.from_conv(conv, algo="im2col")
    assert fc.weight is conv.weight and fc.bias is conv.bias and fc.algo == "im2col"


class _Tagged(torch.Tensor):
    """A plain __torch_function__ subclass: PyTorch's ops return it for its inputs."""


@pytest.mark.parametrize("train", [True, False])
def test_tensor_subclass_inputs_keep_their_type(kernel_backend, kdevice, train):
    """As nn's modules, fastconv's return a tensor subclass for a subclass input (its __torch_function__ sees the
    custom op: the eager fast path, which would return a plain tensor, leaves subclasses to it), with nn's values
    and input gradient (float64 reference)."""
    torch.manual_seed(0)
    pairs = [
        (fastconv.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)),
        (fastconv.MaxPool2d(2), nn.MaxPool2d(2)),
        (fastconv.ConvBNReLU2d(3, 4, 3, padding=1), nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4),
                                                                 nn.ReLU())),
    ]
    x = torch.randn(2, 3, 6, 5, device=kdevice)
    for ours, ref in pairs:
        ours, ref = ours.to(kdevice).train(train), ref.to(kdevice).double().train(train)
        state = ours.state_dict()
        if isinstance(ref, nn.Sequential):  # ConvBNReLU2d's conv. / bn. keys as the Sequential's 0. / 1.
            state = {k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in state.items()}
        ref.load_state_dict(state)
        xs = x.clone().as_subclass(_Tagged).requires_grad_()
        y = ours(xs)
        assert type(y) is _Tagged, (type(ours).__name__, type(y))
        xd = x.double().requires_grad_()
        y_ref = ref(xd)
        assert_close(y.as_subclass(torch.Tensor), y_ref, torch.float32, type(ours).__name__)
        g = torch.randn(y.shape, device=kdevice)
        (dx,) = torch.autograd.grad(y, xs, g)
        (dx_ref,) = torch.autograd.grad(y_ref, xd, g.double())
        assert_close(dx.as_subclass(torch.Tensor), dx_ref, torch.float32, f"{type(ours).__name__} dx")
