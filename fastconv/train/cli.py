"""Command line of `python -m fastconv.train`."""
from __future__ import annotations

import argparse
import sys

from .. import _backend, models
from .data import DataNotFound

EPILOG = """examples:
  python -m fastconv.train --data synthetic --model simple_cnn_bn --epochs 2 --out runs/smoke
  python -m fastconv.train --data cifar10 --download --model cifar10_cnn --epochs 30 --amp bf16 --channels-last --out runs/c10
  torchrun --nproc_per_node 8 -m fastconv.train --data cifar10 --model resnet --out runs/ddp
  python -m fastconv.train --data synthetic --model resnet --profile runs/prof
"""


# torch.compile's modes (`--compile MODE`); those with CUDA graphs mark each step's start (engine.Run)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastconv.train", description=(
        "Train a CNN on CIFAR-10 (or class-per-folder images, or generated CIFAR-format data) with fastconv's "
        "fused kernels, or with plain PyTorch for comparison."), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="cifar10", help="cifar10 | imagefolder:PATH | synthetic (default cifar10)")
    d.add_argument("--data-dir", default="~/.cache/fastconv/data", help="where data sets live (default %(default)s)")
    d.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    d.add_argument("--synthetic-train", type=int, default=5000, help="synthetic training images (default %(default)s)")
    d.add_argument("--synthetic-test", type=int, default=1000, help="synthetic test images (default %(default)s)")
    d.add_argument("--workers", type=int, default=2, help="data loader worker processes per process")
    d.add_argument("--crop-padding", type=int, default=4, help="random crop with this padding; 0 disables")
    d.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    d.add_argument("--rotation", type=float, default=0.0, help="random rotation up to this many degrees")
    d.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation jitter")

    m = p.add_argument_group("model and recipe")
    m.add_argument("--model", default="cifar10_cnn", choices=models.names())
    m.add_argument("--epochs", type=int, default=30)
    m.add_argument("--batch-size", type=int, default=128, help="per process")
    m.add_argument("--optimizer", default="sgd", choices=("sgd", "adam", "adamw"))
    m.add_argument("--lr", type=float, default=0.05)
    m.add_argument("--momentum", type=float, default=0.9)
    m.add_argument("--nesterov", action="store_true")
    m.add_argument("--weight-decay", type=float, default=5e-4)
    m.add_argument("--schedule", default="onecycle", choices=("step", "cosine", "onecycle", "none"))
    m.add_argument("--lr-step-epochs", type=int, default=30, help="step schedule: epochs between decays")
    m.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule: decay factor")
    m.add_argument("--label-smoothing", type=float, default=0.0)

    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    r.add_argument("--amp", default="none", choices=("none", "fp16", "bf16"),
                   help="autocast dtype (fp16 uses a GradScaler)")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last model and batches (default: on for CUDA, where fastconv's Triton GEMMs read "
                        "channels_last operands and NCHW ones cost layout copies; off on CPU)")
    r.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the model, in torch.compile's MODE (default: 'default'): "
                        f"{' | '.join(COMPILE_MODES)}. reduce-overhead replays each step's kernels as CUDA graphs, "
                        "which removes the host time of every launch (fastconv's Triton path costs more of it than "
                        "cuDNN, docs/benchmarks.md); on CPU it compiles as 'default'")
    r.add_argument("--fastconv", action=argparse.BooleanOptionalAction, default=True,
                   help="run on fastconv's kernels (default) or plain PyTorch (--no-fastconv)")
    r.add_argument("--backend", default="auto", choices=_backend.NAMES, help="fastconv backend (default auto)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-steps", type=int, default=None, help="stop after this many training steps in all")
    r.add_argument("--log-interval", type=int, default=10, help="steps between progress-bar updates")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")

    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="directory for checkpoint.pt and metrics.json")
    o.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from OUT/checkpoint.pt (or the given checkpoint)")
    o.add_argument("--profile", default=None, metavar="DIR",
                   help="profile a few steps with torch.profiler, write traces to DIR and stop")
    o.add_argument("--profile-wait", type=int, default=1)
    o.add_argument("--profile-warmup", type=int, default=1)
    o.add_argument("--profile-active", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    from .engine import run

    try:
        return run(args)
    except DataNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
