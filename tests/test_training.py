"""A short training run of a converted CNN reproduces plain PyTorch's loss curve from the same
initialisation (fp64, SGD with momentum, Triton kernels under the interpreter)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastconv

pytestmark = pytest.mark.usefixtures("triton_backend")


class TinyCNN(nn.Module):
    """conv-BN-ReLU-pool stages + a residual conv-BN pair + MLP head, written as forward code."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv3, self.bn3 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(16 * 4 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)) + x)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _train(model, batches, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    losses = []
    model.train()
    for x, y in batches[:steps]:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_curve_matches_pytorch(device):
    torch.manual_seed(0)
    plain = TinyCNN().double().to(device)
    converted = fastconv.convert(copy.deepcopy(plain))
    fused = [m for m in converted.modules() if getattr(m, "_fused_bn", None) is not None]
    assert len(fused) == 3, "conv-BN(-ReLU) chains fused (incl. the residual one)"
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64).to(device),
                torch.randint(0, 10, (4,), generator=gen).to(device)) for _ in range(2)]
    expected = _train(plain, batches, 2)  # 4 optimizer steps
    got = _train(converted, batches, 2)
    assert expected[-1] != expected[0]
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b)), f"step {step}: {a} vs {b}"
    plain.eval()
    converted.eval()
    x = batches[0][0]
    torch.testing.assert_close(converted(x), plain(x), rtol=1e-9, atol=1e-9)
