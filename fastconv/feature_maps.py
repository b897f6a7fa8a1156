"""Feature maps: the activations of chosen layers for one image, saved as a PNG grid (one row per
layer, one panel per channel).

    python -m fastconv.feature_maps --checkpoint runs/x/checkpoint.pt image.png --out maps.png
    python -m fastconv.feature_maps --model simple_cnn image.png --layers features.1 features.4

Layers are named as in model.named_modules(); the default is every Conv2d. Hooks are registered on the
plain model before any conversion: fastconv.convert() never fuses a module that carries hooks, so each
hooked layer's output is exactly what that layer computes in the plain model.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from . import models


def default_layers(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def feature_maps(model: nn.Module, image: torch.Tensor, layers: list[str] | None = None,
                 fastconv: bool = False) -> dict[str, torch.Tensor]:
    """{layer name: its output (C, H, W)} for one image (C, H, W) or (1, C, H, W), `model` in eval mode.
    With `fastconv` the forward runs on a fastconv.convert()ed copy (hooked layers stay unfused)."""
    layers = layers or default_layers(model)
    named = dict(model.named_modules())
    unknown = [name for name in layers if name not in named]
    if unknown:
        raise ValueError(f"no layer named {', '.join(unknown)}; layers with 4-D outputs include "
                         f"{', '.join(default_layers(model)[:8])}")
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        def hook(module, args, output, name=name):
            outputs[name] = output.detach()[0].float().cpu()
        handles.append(named[name].register_forward_hook(hook))
    try:
        runner = model
        if fastconv:
            from .convert import convert
            runner = convert(model)
        runner.eval()(image if image.dim() == 4 else image.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    bad = [name for name in layers if outputs[name].dim() != 3]
    if bad:
        raise ValueError(f"layers {', '.join(bad)} do not output feature maps (C, H, W)")
    return {name: outputs[name] for name in layers}


def save_grid(maps: dict[str, torch.Tensor], path: str | Path, max_channels: int = 16) -> Path:
    """One row per layer with up to `max_channels` channels, each scaled to its own min..max."""
    rows = len(maps)
    cols = min(max_channels, max(m.shape[0] for m in maps.values()))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.3 * rows), squeeze=False)
    for r, (name, fmap) in enumerate(maps.items()):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < fmap.shape[0]:
                ax.imshow(fmap[c].numpy(), cmap="viridis")
                if c == 0:
                    ax.set_title(f"{name} {tuple(fmap.shape)}", fontsize=7, loc="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m fastconv.feature_maps", description=__doc__.split("\n\n")[0])
    p.add_argument("image", help="an image file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint.pt written by python -m fastconv.train")
    src.add_argument("--model", choices=models.names(), help="an untrained model (random weights)")
    p.add_argument("--layers", nargs="+", default=None, help="module names (default: every Conv2d)")
    p.add_argument("--channels", type=int, default=16, help="channels shown per layer (default %(default)s)")
    p.add_argument("--fastconv", action="store_true", help="run the forward on fastconv's kernels")
    p.add_argument("--out", default="feature_maps.png")
    args = p.parse_args(argv)
    from PIL import Image

    from .predict import preprocess
    from .train.data import CIFAR_MEAN, CIFAR_STD

    if args.checkpoint:
        from .train import checkpoint as ckpt

        state = ckpt.load(args.checkpoint)
        model = models.build(state["model_name"], num_classes=state["num_classes"], fastconv=False)
        model.load_state_dict(state["model"])
    else:
        model = models.build(args.model, fastconv=False)
        state = {"input_size": list(models.input_size(args.model)),
                 "normalization": {"mean": list(CIFAR_MEAN), "std": list(CIFAR_STD)}}
    Image.open(args.image).verify()
    image = preprocess([args.image], state)
    path = save_grid(feature_maps(model, image, args.layers, args.fastconv), args.out, args.channels)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
