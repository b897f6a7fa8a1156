"""Resumable checkpoints. The model's state_dict is saved from the unwrapped model (no DDP `module.` or
torch.compile `_orig_mod.` prefixes), with the same keys as the plain PyTorch model, so it loads into
fastconv.models.build(name, fastconv=False) as well as into the converted model. Everything is a tensor,
number, string, list, tuple or dict: torch.load(..., weights_only=True) reads it."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

FILENAME = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, state: dict) -> None:
    """Write atomically (a crash mid-save leaves the previous checkpoint intact)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)
