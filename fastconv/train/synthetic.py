"""A generated, learnable CIFAR-format dataset, so the whole training pipeline runs offline.

`write(root, ...)` writes `root/cifar-10-batches-py/` exactly as the real CIFAR-10 python archive lays
it out (data_batch_1..5 and test_batch: pickled dicts with a uint8 `data` array of N x 3072 (the red,
green and blue 32x32 planes of each image) and a `labels` list; batches.meta with `label_names`), and
SyntheticCIFAR10 reads it back through torchvision's own CIFAR10 loader.

Each class is a fixed random low-frequency colour pattern; an image is its class's pattern, shifted by a
few pixels, with a random brightness offset and pixel noise, so a small CNN learns it in an epoch or two
while it still takes convolution (not a single pixel) to tell the classes apart.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10

FOLDER = CIFAR10.base_folder  # "cifar-10-batches-py"
MANIFEST = "fastconv-synthetic.json"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(rng: np.random.Generator, templates: np.ndarray, n: int) -> tuple[np.ndarray, list[int]]:
    labels = rng.integers(0, len(templates), n)
    images = templates[labels].copy()
    shifts = rng.integers(-3, 4, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        images[i] = np.roll(images[i], (int(dy), int(dx)), axis=(1, 2))
    images += rng.normal(0.0, 30.0, size=(n, 1, 1, 1)) + rng.normal(0.0, 25.0, size=images.shape)
    data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)
    return data, [int(label) for label in labels]


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write(root: str | Path, train_size: int = 5000, test_size: int = 1000, num_classes: int = 10,
          seed: int = 0) -> Path:
    """Write the dataset under `root` (skipped when the same one is already there); returns its folder."""
    root = Path(root)
    folder = root / FOLDER
    config = {"train_size": train_size, "test_size": test_size, "num_classes": num_classes, "seed": seed}
    manifest = folder / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text()).get("config") == config:
        return folder
    if train_size < len(TRAIN_FILES) or test_size < 1 or num_classes < 2:
        raise ValueError(f"synthetic data needs >= {len(TRAIN_FILES)} training images, >= 1 test image and "
                         f">= 2 classes (got {train_size}, {test_size}, {num_classes})")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(num_classes, 3, 4, 4))
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)  # 4x4 colour blocks of 8x8 pixels
    train_data, train_labels = _images(rng, templates, train_size)
    test_data, test_labels = _images(rng, templates, test_size)
    chunks = np.array_split(np.arange(train_size), len(TRAIN_FILES))
    for i, (name, idx) in enumerate(zip(TRAIN_FILES, chunks)):
        _dump(folder / name, {"batch_label": f"synthetic training batch {i + 1} of 5",
                              "labels": [train_labels[j] for j in idx], "data": train_data[idx],
                              "filenames": [f"synthetic_{j:06d}.png" for j in idx]})
    _dump(folder / TEST_FILE, {"batch_label": "synthetic testing batch 1 of 1", "labels": test_labels,
                               "data": test_data, "filenames": [f"synthetic_test_{j:06d}.png" for j in range(test_size)]})
    _dump(folder / CIFAR10.meta["filename"], {"label_names": [f"pattern_{c}" for c in range(num_classes)],
                                              "num_cases_per_batch": len(chunks[0]), "num_vis": 3 * 32 * 32})
    checksums = {name: _md5(folder / name) for name in TRAIN_FILES + [TEST_FILE, CIFAR10.meta["filename"]]}
    manifest.write_text(json.dumps({"config": config, "md5": checksums}, indent=1))  # written last: marks completion
    return folder


class SyntheticCIFAR10(CIFAR10):
    """torchvision's CIFAR10 reading the files `write` made.

    CIFAR10 verifies every file against the md5 sum of the *real* CIFAR-10 archive (class attributes
    train_list, test_list and meta), which generated files can never match. Rather than skipping that
    check, this instance replaces those lists with the md5 sums `write` recorded in its manifest, so
    torchvision's own integrity check still runs and catches a truncated or altered file."""

    def __init__(self, root: str | Path, train: bool = True, transform=None, target_transform=None):
        manifest = Path(root) / FOLDER / MANIFEST
        if not manifest.exists():
            raise RuntimeError(f"no synthetic CIFAR-format dataset under {root} (fastconv.train.synthetic.write makes one)")
        md5 = json.loads(manifest.read_text())["md5"]
        self.train_list = [[name, md5[name]] for name in TRAIN_FILES]
        self.test_list = [[TEST_FILE, md5[TEST_FILE]]]
        self.meta = {**CIFAR10.meta, "md5": md5[CIFAR10.meta["filename"]]}
        super().__init__(str(root), train=train, transform=transform, target_transform=target_transform, download=False)
