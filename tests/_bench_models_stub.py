"""A stand-in for fastconv.models (issue 5) with the same interface, so tests/test_bench.py can exercise
bench/bench_models.py before that package exists: names(), build(name, num_classes, fastconv), input_size()."""
from __future__ import annotations

from torch import nn


def names() -> list[str]:
    return ["lenet5"]


def input_size(name: str) -> tuple[int, int, int]:
    return (3, 32, 32)


def build(name: str, num_classes: int = 10, fastconv: bool = True) -> nn.Module:
    if name != "lenet5":
        raise ValueError(f"unknown model {name!r}")
    model = nn.Sequential(
        nn.Conv2d(3, 6, 5), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )
    if fastconv:
        import fastconv as fc

        model = fc.convert(model)
    return model
