"""fastconv.convert: swaps convs and max-pools for fastconv's, fuses conv -> BatchNorm2d -> activation
(+ residual) into conv_bn_act calls, keeps state_dicts interchangeable both ways; the converted model
matches the original in eval and in a training step (loss, gradients, running statistics)."""
from __future__ import annotations

import collections
import copy
import pickle
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastconv
from fastconv.convert import FusedConv2d, PassThroughBatchNorm2d, convert

from .helpers import SESSION_SEED, assert_close, generator, randn


pytestmark = pytest.mark.usefixtures("triton_backend")


# ---------------------------------------------------------------------------------------------------------
# Hand-written models in the style of the PyTorch tutorials


class TutorialNet(nn.Module):
    """Three conv-relu-pool stages and an MLP, as in the CIFAR-10 tutorial."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 12, 3, padding=1)
        self.conv3 = nn.Conv2d(12, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.pool(F.relu(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class ConvBNNet(nn.Module):
    """conv-BN-activation(-pool) stages in forward code: every activation spelling, and the BatchNorm
    variants (momentum=None, affine=False, track_running_stats=False), groups, reflect padding."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12, momentum=None), nn.ReLU6()
        self.conv3, self.bn3 = nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.BatchNorm2d(12, affine=False)
        self.conv4 = nn.Conv2d(12, 16, 3, padding=1, padding_mode="reflect")
        self.bn4, self.act4 = nn.BatchNorm2d(16, track_running_stats=False), nn.Hardswish()
        self.conv5, self.bn5 = nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.pool(F.silu(self.bn3(self.conv3(x))))
        x = self.act4(self.bn4(self.conv4(x)))
        x = self.bn5(self.conv5(x)).relu()
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _vgg_block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]


class VGGStyle(nn.Module):
    """VGG-style double conv-BN-ReLU blocks in nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*_vgg_block(3, 8), *_vgg_block(8, 16))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 conv + BN projection or an empty nn.Sequential."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.layer1 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class AlexNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(24 * 4, 32), nn.ReLU(inplace=True), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


_tv = torchvision.models


def _resnet18_head():
    """torchvision resnet18's stem and first blocks of layer1 and layer2 (identity / projection shortcut)."""
    m = _tv.resnet18(weights=None)
    return nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool, m.layer1[0], m.layer2[0])


# name: (constructor, input size (H=W), fused convs expected, backend for the numerics on CPU).
# Whole torchvision models take minutes to tens of minutes per forward in the Triton interpreter (their
# 256-960-channel and depthwise convs), so on CPU their numerics run on the 'torch' backend (conversion,
# fusion, BatchNorm bookkeeping and checkpoints are the same), and the Triton kernels run on the heads of
# resnet18 and of a narrow mobilenet_v2 (plus, marked slow, all of resnet18 in eval). On a GPU every
# float32 case runs on Triton. Inputs are large enough that training-mode BatchNorm sees more than two
# values per channel (with two it amplifies rounding differences up to 1/sqrt(eps) = 316 times).
MODELS = {
    "tutorial": (TutorialNet, 16, 0, "triton"),
    "conv_bn": (ConvBNNet, 16, 5, "triton"),
    "vgg_style": (VGGStyle, 16, 4, "triton"),
    "resnet_like": (ResNetLike, 16, 6, "triton"),
    "alexnet_like": (AlexNetLike, 32, 0, "triton"),
    "resnet18_head": (_resnet18_head, 16, 6, "triton"),
    "mobilenet_v2_head": (lambda: _tv.mobilenet_v2(weights=None, width_mult=0.25).features[:3], 16, 6, "triton"),
    "resnet18": (lambda: _tv.resnet18(weights=None, num_classes=10), 64, 20, "torch"),
    "mobilenet_v2": (lambda: _tv.mobilenet_v2(weights=None, num_classes=10), 48, 52, "torch"),
    "vgg11_bn": (lambda: _tv.vgg11_bn(weights=None, num_classes=10), 64, 8, "torch"),
    "alexnet": (lambda: _tv.alexnet(weights=None, num_classes=10), 64, 0, "torch"),  # needs >= 63x63
    "googlenet": (lambda: _tv.googlenet(weights=None, num_classes=10, aux_logits=False, init_weights=False),
                  64, 57, "torch"),
    "squeezenet1_0": (lambda: _tv.squeezenet1_0(weights=None, num_classes=10), 64, 0, "torch"),
    "mobilenet_v3_small": (lambda: _tv.mobilenet_v3_small(weights=None, num_classes=10), 64, 34, "torch"),
}
ALL_BN_FUSE = ("conv_bn", "vgg_style", "resnet_like", "resnet18_head", "mobilenet_v2_head", "resnet18",
               "mobilenet_v2", "vgg11_bn", "googlenet", "mobilenet_v3_small")


def _build(name):
    """The model with non-trivial BatchNorm parameters and statistics (fresh ones each session)."""
    torch.manual_seed(SESSION_SEED)
    model = MODELS[name][0]()
    gen = generator("bn", name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


def _fused_convs(model):
    return [m for m in model.modules() if isinstance(m, FusedConv2d)]


@pytest.mark.parametrize("name", list(MODELS))
def test_structure_and_checkpoints(name):
    original = _build(name)
    converted = convert(original)
    fused = MODELS[name][2]
    # a Sequential with a fused block followed by another or by a max-pool becomes a FusedSequential
    assert type(converted) is type(original) or (type(original) is nn.Sequential
                                                 and type(converted) is fastconv.modules.FusedSequential)
    assert len(_fused_convs(converted)) == fused == _count(converted, PassThroughBatchNorm2d)
    assert {conv.activation for conv in _fused_convs(converted)} <= {"identity", "relu", "relu6", "silu", "hardswish"}
    assert _count(converted, nn.Conv2d) == 0 and _count(converted, nn.MaxPool2d) == 0
    assert _count(converted, fastconv.Conv2d) + fused == _count(original, nn.Conv2d)
    assert _count(converted, fastconv.MaxPool2d) == _count(original, nn.MaxPool2d)
    if name in ALL_BN_FUSE:
        assert _count(converted, nn.BatchNorm2d) == 0, "every conv-BN pair of this model fuses"
    # Checkpoints interchange, strict, both ways: same keys in the same order.
    assert list(converted.state_dict()) == list(original.state_dict())
    fresh = MODELS[name][0]()
    fresh.load_state_dict(converted.state_dict(), strict=True)  # converted -> original architecture
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in fresh.state_dict().items())
    fresh = convert(MODELS[name][0](), inplace=True)
    fresh.load_state_dict(original.state_dict(), strict=True)  # original -> converted
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in fresh.state_dict().items())


def _cases():
    """(model, backend on CPU, input size); on a GPU every case runs on Triton. The last case, all of
    resnet18 in the interpreter, takes minutes (its 512-channel layers)."""
    cases = [pytest.param(name, MODELS[name][3], MODELS[name][1], id=name) for name in MODELS]
    return cases + [pytest.param("resnet18", "triton", 32, id="resnet18-triton", marks=pytest.mark.slow)]


def _on(backend, device):
    return fastconv.backend(backend if device.type == "cpu" else "triton")


@pytest.mark.parametrize("name, backend, size", _cases())
def test_eval_matches_original(name, backend, size, device):
    original = _build(name).to(device).eval()
    converted = convert(original)
    x = randn((1, 3, size, size), torch.float32, device, generator("x", name))
    start = time.perf_counter()
    with _on(backend, device):
        y = converted(x)
    elapsed = time.perf_counter() - start
    assert_close(y, original(x), torch.float32, f"{name} eval output (converted forward: {elapsed:.1f}s)")


def _train_step(model, x, name):
    torch.manual_seed(SESSION_SEED)  # the same dropout masks in both models
    y = model(x)
    loss = (y * randn(y.shape, y.dtype, y.device, generator("w", name))).sum()
    loss.backward()
    return loss


@pytest.mark.parametrize("name, backend, size", _cases()[:-1])
def test_train_step_matches_original(name, backend, size, device):
    """One forward + backward in train(): same loss, gradients, running statistics, num_batches_tracked.
    The whole torchvision models compare in float64 on the 'torch' backend: in float32 their gradients
    through dozens of training-mode BatchNorms are ill-conditioned (a rounding difference in a
    near-constant channel grows to 1e-1), while in float64 they agree to ~1e-13."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    original = _build(name).to(device, dtype).train()
    converted = convert(original)
    x = randn((2, 3, size, size), dtype, device, generator("x", name))
    with fastconv.backend(backend if dtype == torch.float64 or device.type == "cpu" else "triton"):
        loss = _train_step(converted, x, name)
    loss_ref = _train_step(original, x, name)
    assert_close(loss, loss_ref, dtype, f"{name} loss")
    params = dict(converted.named_parameters())
    for key, p_ref in original.named_parameters():
        assert_close(params[key].grad, p_ref.grad, dtype, f"{name} grad of {key}")
    buffers = dict(converted.named_buffers())
    for key, b_ref in original.named_buffers():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(buffers[key], b_ref), key
        else:
            assert_close(buffers[key], b_ref, dtype, f"{name} {key} after the step")


def test_residual_add_is_fused_into_the_conv():
    """relu(bn2(conv2(x)) + shortcut): conv2 gets the shortcut as its residual argument, in forward code
    (hand-written blocks and torchvision's BasicBlock alike)."""
    for name, blocks in (("resnet_like", 2), ("resnet18", 8)):
        converted = convert(_build(name)).eval()
        residual_calls = []
        for conv in _fused_convs(converted):
            conv.register_forward_pre_hook(lambda m, args: residual_calls.append(len(args) == 2))
        with fastconv.backend("torch"):
            converted(torch.randn(1, 3, 16, 16))
        assert sum(residual_calls) == blocks, name
        block = converted.layer1[0]
        assert block.conv2.activation == "relu" and "forward" in vars(block)


def test_submodules_called_directly_match(device):
    """Each module's own forward is fused, so calling a block directly still gives the original's result."""
    original = _build("resnet_like").to(device).eval()
    converted = convert(original)
    x = randn((2, 8, 8, 8), torch.float32, device, generator("block"))
    assert_close(converted.layer1[0](x), original.layer1[0](x), torch.float32, "block called directly")
    assert_close(converted.layer1[0].shortcut(x), original.layer1[0].shortcut(x), torch.float32, "shortcut")


def test_inplace_false_leaves_the_original_untouched_and_inplace_true_converts_it():
    original = _build("resnet_like")
    before = {k: v.clone() for k, v in original.state_dict().items()}
    types = [type(m) for m in original.modules()]
    converted = convert(original)
    assert converted is not original
    assert [type(m) for m in original.modules()] == types and "forward" not in vars(original)
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
    assert not set(map(id, converted.parameters())) & set(map(id, original.parameters()))
    same = convert(original, inplace=True)
    assert same is original and _count(original, FusedConv2d) == 6


def test_fuse_false_only_swaps():
    converted = convert(_build("conv_bn"), fuse=False)
    assert _count(converted, fastconv.Conv2d) == 5 and _count(converted, nn.BatchNorm2d) == 5
    assert _count(converted, FusedConv2d) == 0 and _count(converted, fastconv.MaxPool2d) == 1


def test_modules_with_hooks_are_not_fused_away(device):
    original = _build("conv_bn").to(device).eval()
    calls = []
    original.bn1.register_forward_hook(lambda m, i, o: calls.append("bn1"))  # conv1+bn1 stay apart
    original.conv3.register_forward_pre_hook(lambda m, i: calls.append("conv3"))  # conv3+bn3 stay apart
    original.act2.register_forward_hook(lambda m, i, o: calls.append("act2"))  # conv2+bn2 fuse, act2 stays
    converted = convert(original)
    assert type(converted.conv1) is fastconv.Conv2d and type(converted.bn1) is nn.BatchNorm2d
    assert type(converted.conv3) is fastconv.Conv2d and type(converted.bn3) is nn.BatchNorm2d
    assert converted.conv2.activation == "identity" and type(converted.act2) is nn.ReLU6
    assert len(_fused_convs(converted)) == 3
    x = randn((1, 3, 16, 16), torch.float32, device, generator("hooks"))
    y_ref = original(x)
    del calls[:]
    assert_close(converted(x), y_ref, torch.float32, "output with hooks")
    assert sorted(calls) == ["act2", "bn1", "conv3"]  # the hooks were kept and still fire


def test_sequential_modules_with_hooks_are_not_fused_away():
    seq = nn.Sequential(*_vgg_block(3, 8))
    seq[4].register_forward_hook(lambda m, i, o: None)
    seq[2].register_forward_hook(lambda m, i, o: None)
    converted = convert(seq)
    assert isinstance(converted[0], FusedConv2d) and converted[0].activation == "identity"
    assert type(converted[2]) is nn.ReLU and type(converted[4]) is nn.BatchNorm2d
    assert type(converted[3]) is fastconv.Conv2d


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        if x.mean() > 0:
            x = self.block(x)
        return self.pool(x)


class TrainingBranch(Untraceable):
    """Traces, but to a different graph in train() and eval()."""

    def forward(self, x):
        x = self.bn(self.conv(x))
        if self.training:
            x = x * 0.5
        return self.pool(self.block(F.relu(x)))


@pytest.mark.parametrize("cls, why", [(Untraceable, "its forward does not trace: TraceError"),
                                      (TrainingBranch, "its forward depends on self.training")],
                         ids=["data_dependent", "training_branch"])
def test_untraceable_model_warns_and_still_swaps(cls, why, device):
    torch.manual_seed(SESSION_SEED)
    original = cls().to(device)
    message = rf"fusion via torch.fx tracing was skipped for the model \({cls.__name__}\) because {why}"
    with pytest.warns(UserWarning, match=message):
        converted = convert(original)
    assert type(converted.conv) is fastconv.Conv2d and type(converted.bn) is nn.BatchNorm2d
    assert isinstance(converted.block[0], FusedConv2d)  # nn.Sequential runs are fused without tracing
    assert type(converted.pool) is fastconv.MaxPool2d and "forward" not in vars(converted)
    x = randn((2, 3, 8, 8), torch.float32, device, generator("untraceable"))
    for mode in (True, False):
        assert_close(converted.train(mode)(x), original.train(mode)(x), torch.float32, f"training={mode}")


class Shapes(nn.Module):
    """Chains that must not fuse (conv output used twice, shared BN), a residual that must not be fused
    (the conv's input is written in place before the add), and a residual that only broadcasts."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.offset = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        y = self.conv1(x)
        y = F.relu(self.bn1(y)) + y  # conv1's output has two users
        z = self.bn3(self.conv3(y))
        y.sigmoid_()  # conv3 must read y before this
        z = F.relu(z + y)
        return F.silu(self.bn2(self.conv2(z)) + self.offset)  # a broadcasting residual


def test_fusion_conditions_and_residuals(device):
    original = Shapes().to(device).eval()
    with torch.no_grad():
        original.bn2.running_var.fill_(2.0)
    converted = convert(original)
    assert type(converted.conv1) is fastconv.Conv2d and type(converted.bn1) is nn.BatchNorm2d
    assert converted.conv3.activation == "identity" and converted.conv2.activation == "silu"
    x = randn((2, 3, 6, 6), torch.float32, device, generator("shapes"))
    assert_close(converted(x), original(x), torch.float32, "model with in-place writes and a broadcast residual")
    shared_bn = nn.BatchNorm2d(4)
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), shared_bn, nn.Conv2d(4, 4, 1), shared_bn)
    assert _count(convert(seq), FusedConv2d) == 0  # a module registered twice is never fused


def test_backend_is_pinned_for_the_converted_forward(device):
    with pytest.raises(ValueError, match="unknown fastconv backend"):
        convert(TutorialNet(), backend="nope")
    seen = []
    for name in ("tutorial", "resnet_like"):
        converted = convert(_build(name), backend="torch").to(device).eval()
        conv = next(m for m in converted.modules() if isinstance(m, fastconv.Conv2d))
        conv.register_forward_pre_hook(lambda m, args: seen.append(fastconv.current_backend()))
        with fastconv.backend("triton"):
            converted(torch.zeros(1, 3, 16, 16, device=device))
        assert fastconv.current_backend() == "triton"
    assert seen == ["torch", "torch"]


def test_deepcopy_pickle_and_reconversion_keep_the_fused_model(device):
    original = _build("resnet_like").to(device).eval()
    converted = convert(original, backend="torch")  # this test is about the model, not the kernels
    x = randn((1, 3, 16, 16), torch.float32, device, generator("copy"))
    y = converted(x)
    for clone in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted)), convert(converted)):
        assert clone.forward.module is clone and clone.layer1[0].forward.module is clone.layer1[0]
        assert clone.forward.backend == "torch"
        assert clone.conv1._fused_bn is clone.bn1 and len(_fused_convs(clone)) == 6
        assert torch.equal(clone(x), y)
    assert _count(convert(original, fuse=False), FusedConv2d) == 0


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The ATen ops a region runs, counted by name (in-place and out-of-place overloads apart)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["simple_cnn_bn", "cifar10_cnn", "resnet", "lenet5"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_auto_on_cpu_runs_the_plain_models_ops(name, train):
    """Under the default backend 'auto', a converted model on CPU tensors runs the ATen ops of the plain model
    (issue 16: never a slowdown on CPU): the same ops, counted, except that a fused block's ReLU may run in place
    on its BatchNorm's output where the plain model's ran out of place, never the other way (an out-of-place
    ReLU after a BatchNorm cost the converted CIFAR-10 CNN ~5% of its CPU training step)."""
    from fastconv import models

    torch.manual_seed(0)
    plain = models.build(name, fastconv=False)
    converted = convert(copy.deepcopy(plain))
    x = torch.randn(2, *models.input_size(name), generator=generator("auto_ops", name))
    counts = []
    for model in (plain, converted):
        model.train(train)
        with fastconv.backend("auto"), _AtenOps() as mode, torch.set_grad_enabled(train):
            torch.manual_seed(1)
            out = model(x)
            if train:
                out.sum().backward()
        counts.append(mode.ops)
    inplace = {"aten.relu_.default": "aten.relu.default", "aten.hardtanh_.default": "aten.hardtanh.default"}
    same = [sum((collections.Counter({inplace.get(op, op): n}) for op, n in c.items()), collections.Counter())
            for c in counts]
    assert same[1] == same[0], (same[1] - same[0], same[0] - same[1])
    for op in inplace:
        assert counts[1][op] >= counts[0][op], (op, counts[1][op], counts[0][op])
