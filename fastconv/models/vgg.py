"""VGG-style CIFAR networks: double conv-BN-ReLU blocks (CIFAR10CNN) and VGG-16 with BatchNorm."""
from __future__ import annotations

import torch
from torch import nn

from .tutorial import conv_bn_relu


class CIFAR10CNN(nn.Module):
    """Blocks of [conv-BN-ReLU, conv-BN-ReLU, maxpool] with 64, 128, 256 channels (32 -> 16 -> 8 -> 4),
    classifier Dropout-4096->512-ReLU-Dropout-classes: the usual ">90 % on CIFAR-10" recipe."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (64, 128, 256):
            layers += [*conv_bn_relu(cin, cout), *conv_bn_relu(cout, cout), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(256 * 4 * 4, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# VGG-16 configuration D: 13 convs; "M" is a 2x2 max-pool.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG-16 (configuration D) with BatchNorm, CIFAR-sized: five pools take 32x32 to 1x1, so the
    classifier is a single Linear 512->classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in VGG16_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn_relu(cin, v)
                cin = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
