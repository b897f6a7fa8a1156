"""`python -m fastconv.predict --checkpoint CKPT IMAGE...`: classify images with a model trained by
`python -m fastconv.train`. The checkpoint names the model, its classes, its input size and the
normalisation used in training; each image is resized to that size, normalised and batched."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from . import models
from .train import checkpoint as ckpt
from .train.data import eval_transform


def load_model(checkpoint: str | Path, fastconv: bool = True, device: str | torch.device = "cpu"):
    """(model in eval mode, checkpoint dict) from a training checkpoint."""
    state = ckpt.load(checkpoint)
    model = models.build(state["model_name"], num_classes=state["num_classes"], fastconv=fastconv)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def preprocess(paths, state: dict) -> torch.Tensor:
    """The images as one normalised batch of the checkpoint's input size."""
    size = tuple(state["input_size"][1:])
    norm = state["normalization"]
    transform = eval_transform(size, norm["mean"], norm["std"], resize=True)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@torch.no_grad()
def predict(checkpoint: str | Path, images, top: int = 3, fastconv: bool = True,
            device: str | torch.device = "cpu") -> list[list[tuple[str, float]]]:
    """For each image, its `top` most probable classes as (class name, probability)."""
    model, state = load_model(checkpoint, fastconv, device)
    probabilities = torch.softmax(model(preprocess(images, state).to(device)).float(), dim=1)
    values, indices = probabilities.topk(min(top, probabilities.shape[1]), dim=1)
    names = state["class_names"]
    return [[(names[i], p) for p, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]


def main(argv: list[str] | None = None) -> list:
    p = argparse.ArgumentParser(prog="python -m fastconv.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by python -m fastconv.train")
    p.add_argument("images", nargs="+", help="image files (any size; resized to the model's input)")
    p.add_argument("--top", type=int, default=3, help="classes to show per image (default %(default)s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fastconv", action=argparse.BooleanOptionalAction, default=True,
                   help="run on fastconv's kernels (default) or plain PyTorch")
    args = p.parse_args(argv)
    results = predict(args.checkpoint, args.images, args.top, args.fastconv, args.device)
    for path, result in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{name} {prob:.1%}" for name, prob in result))
    return results


if __name__ == "__main__":
    main()
