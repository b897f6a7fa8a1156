"""AlexNet for 227x227 input (one GPU tower, no local response normalisation).

Shapes: 227 -conv11x11/4-> 55 -pool3/2-> 27 -conv5x5 p2-> 27 -pool-> 13 -conv3x3 p1 (x3)-> 13, 13, 13
-pool-> 6; 256*6*6 = 9216 features -> 4096 -> classes.
"""
from __future__ import annotations

import torch
from torch import nn


class AlexNet(nn.Module):
    """conv11x11/4(96)-ReLU-pool3/2, conv5x5(256, p2)-ReLU-pool, conv3x3(384)-ReLU, conv3x3(384)-ReLU,
    conv3x3(256)-ReLU-pool; classifier Dropout-9216->4096-ReLU-Dropout-classes. The class defaults to
    200 classes (Tiny-ImageNet-style use); fastconv.models.build passes num_classes (10 unless given)."""

    def __init__(self, num_classes: int = 200, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, stride=4), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
