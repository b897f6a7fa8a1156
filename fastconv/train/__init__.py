"""`python -m fastconv.train`: the CIFAR-10 training CLI (see `python -m fastconv.train --help`).

Files: cli (arguments), data + synthetic (data sets, transforms, loaders), engine (the loop), optim,
checkpoint, metrics, distributed (torchrun/DDP), profiling (torch.profiler)."""
from .cli import main, parser

__all__ = ["main", "parser"]
