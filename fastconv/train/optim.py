"""Optimizers and per-step learning-rate schedules of the standard CIFAR recipes."""
from __future__ import annotations

import torch
from torch import nn


def optimizer(name: str, model: nn.Module, lr: float, momentum: float, weight_decay: float,
              nesterov: bool = False) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adam or adamw")


def scheduler(name: str, opt: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int, lr: float,
              step_epochs: int = 30, gamma: float = 0.1):
    """Stepped once per training step, so resuming mid-epoch continues the schedule exactly.
    step: lr x gamma every `step_epochs` epochs; cosine: cosine decay to 0 over the run; onecycle:
    warm-up to `lr` then annealing (OneCycleLR); none: constant."""
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, step_epochs * steps_per_epoch), gamma=gamma)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(2, total_steps))
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    raise ValueError(f"unknown lr schedule {name!r}; choose step, cosine, onecycle or none")
