"""fastconv.models: every architecture's output shape and parameter count (expected counts computed here
from the documented layer lists), AlexNet's shape walk-through, plain vs converted outputs (eval and
train mode, backend 'auto': PyTorch's kernels through fastconv's ops on CPU, the Triton kernels on a
GPU; test_convert/test_training run the Triton kernels on CPU through the interpreter, too slow for whole
networks of these widths), and state_dicts loading both ways."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastconv
from fastconv import models
from fastconv.convert import FusedConv2d

from .helpers import SESSION_SEED, assert_close, generator, randn


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def linear(i, o):
    return i * o + o


def _resnet18(classes):
    stem = conv(3, 64, 3, bias=False) + bn(64)
    total, cin = stem, 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            total += conv(cin, cout, 3, bias=False) + bn(cout) + conv(cout, cout, 3, bias=False) + bn(cout)
            if block == 0 and (stride != 1 or cin != cout):
                total += conv(cin, cout, 1, bias=False) + bn(cout)  # projection shortcut
            cin = cout
    return total + linear(512, classes)


def _vgg16(classes):
    widths = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
    return sum(conv(cin, cout, 3) + bn(cout) for cin, cout in zip((3,) + widths, widths)) + linear(512, classes)


# Parameter counts from the layer lists in the issue (conv bias on, except ResNet's convs).
EXPECTED_PARAMS = {
    "neuralnet": lambda c: conv(3, 16, 5) + conv(16, 32, 3) + conv(32, 64, 3)
    + linear(1024, 256) + linear(256, 128) + linear(128, c),
    "simple_cnn": lambda c: conv(3, 16, 3) + conv(16, 32, 3) + conv(32, 64, 3) + linear(1024, 128) + linear(128, c),
    "simple_cnn_bn": lambda c: conv(3, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64) + conv(64, 128, 3) + bn(128)
    + linear(2048, 256) + linear(256, c),
    "cifar10_cnn": lambda c: sum(conv(a, b, 3) + bn(b) for a, b in ((3, 64), (64, 64), (64, 128), (128, 128),
                                                                  (128, 256), (256, 256)))
    + linear(4096, 512) + linear(512, c),
    "resnet": _resnet18,
    "alexnet": lambda c: conv(3, 96, 11) + conv(96, 256, 5) + conv(256, 384, 3) + conv(384, 384, 3)
    + conv(384, 256, 3) + linear(9216, 4096) + linear(4096, c),
    "lenet5": lambda c: conv(3, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84) + linear(84, c),
    "vgg16": _vgg16,
}
# Published figures for the 10-class models, as a cross-check of the formulas above.
PUBLISHED_10_CLASS = {"resnet": 11_173_962, "vgg16": 14_728_266, "lenet5": 62_006}
FUSED_CHAINS = {"neuralnet": 0, "simple_cnn": 0, "simple_cnn_bn": 3, "cifar10_cnn": 6, "resnet": 20, "alexnet": 0,
                "lenet5": 0, "vgg16": 13}


def test_names_and_input_sizes():
    assert models.names() == list(EXPECTED_PARAMS)
    for name in models.names():
        assert models.input_size(name) == ((3, 227, 227) if name == "alexnet" else (3, 32, 32))
    with pytest.raises(ValueError, match="unknown model 'nope'; choose one of neuralnet"):
        models.build("nope")
    with pytest.raises(ValueError, match="unknown model"):
        models.input_size("resnet50")
    with pytest.raises(ValueError, match="backend only apply with fastconv=True"):
        models.build("lenet5", fastconv=False, backend="torch")
    assert models.AlexNet().classifier[-1].out_features == 200  # the class's own default


def _randomise_batch_norm(model, name):
    """Non-trivial BatchNorm affine parameters and running statistics (fresh per session)."""
    gen = generator("bn", name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_parameter_count_and_output_shape(name):
    plain = models.build(name, num_classes=10, fastconv=False)
    assert sum(p.numel() for p in plain.parameters()) == EXPECTED_PARAMS[name](10)
    if name in PUBLISHED_10_CLASS:
        assert EXPECTED_PARAMS[name](10) == PUBLISHED_10_CLASS[name]
    converted = models.build(name, num_classes=7)
    assert sum(p.numel() for p in converted.parameters()) == EXPECTED_PARAMS[name](7)
    assert sum(isinstance(m, FusedConv2d) for m in converted.modules()) == FUSED_CHAINS[name]
    assert not any(type(m) in (nn.Conv2d, nn.MaxPool2d) for m in converted.modules())
    with torch.no_grad():
        assert converted.eval()(torch.randn(1, *models.input_size(name))).shape == (1, 7)
        assert plain.eval()(torch.randn(1, *models.input_size(name))).shape == (1, 10)


def test_alexnet_shape_walk_through():
    """227 -> 55 -> 27 -> 27 -> 13 -> 13 -> 13 -> 13 -> 6 over its convs and pools, 9216 features."""
    model = models.build("alexnet", fastconv=True).eval()
    sizes, features = [], []
    for m in model.features:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            m.register_forward_hook(lambda mod, args, out: sizes.append(tuple(out.shape[1:])))
    model.classifier[0].register_forward_hook(lambda mod, args, out: features.append(out.shape[1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 227, 227))
    assert [s[1] for s in sizes] == [55, 27, 27, 13, 13, 13, 13, 6]
    assert all(s[1] == s[2] for s in sizes)
    assert [s[0] for s in sizes] == [96, 96, 256, 256, 384, 384, 256, 256]
    assert features == [9216]


@pytest.mark.parametrize("name", list(EXPECTED_PARAMS))
def test_converted_matches_plain_and_state_dicts_load_both_ways(name, device):
    torch.manual_seed(SESSION_SEED)
    plain = _randomise_batch_norm(models.build(name, fastconv=False), name).to(device)
    converted = fastconv.convert(copy.deepcopy(plain))
    x = randn((2, *models.input_size(name)), torch.float32, device, generator("input", name))
    with torch.no_grad():
        expected = plain.eval()(x)
        assert_close(converted.eval()(x), expected, torch.float32, f"{name} eval")
        # A checkpoint of the plain model loads (strictly) into a freshly built converted one, and runs the
        # same; the forward is checked on the small models (CPU time), the tensors on all.
        fresh_converted = models.build(name).to(device).eval()
        fresh_converted.load_state_dict(plain.state_dict())
        for key, value in fresh_converted.state_dict().items():
            assert torch.equal(value, plain.state_dict()[key]), key
        if name not in ("resnet", "vgg16", "alexnet"):
            assert_close(fresh_converted(x), expected, torch.float32, f"{name} converted <- plain checkpoint")

    # ... and the training forward matches: outputs (same dropout masks) and updated running statistics.
    torch.manual_seed(SESSION_SEED)
    expected = plain.train()(x)
    torch.manual_seed(SESSION_SEED)
    assert_close(converted.train()(x), expected, torch.float32, f"{name} train")
    fresh_plain = models.build(name, fastconv=False).to(device)
    fresh_plain.load_state_dict(converted.state_dict())  # converted -> plain, strict
    assert list(converted.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(fresh_plain.state_dict()[key], value), key
        else:
            assert_close(fresh_plain.state_dict()[key], value, torch.float32, f"{name} {key} after the step")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_whole_model_under_autocast(dtype):
    """Inside torch.autocast every conv after the first gets a low-precision input and fp32 weights;
    the converted model runs like the plain one (which nn.Conv2d allows)."""
    torch.manual_seed(SESSION_SEED)
    plain = _randomise_batch_norm(models.build("simple_cnn_bn", fastconv=False), "autocast").eval()
    converted = fastconv.convert(copy.deepcopy(plain))
    x = randn((2, 3, 32, 32), torch.float32, "cpu", generator("autocast"))
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        expected, got = plain(x), converted(x)
    assert got.dtype == expected.dtype
    assert_close(got.float(), expected.float(), dtype, f"simple_cnn_bn under {dtype} autocast")
