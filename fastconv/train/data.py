"""Datasets, transforms and loaders for the training CLI: `cifar10`, `imagefolder:PATH`, `synthetic`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import datasets
from torchvision import transforms as T

from . import synthetic

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class DataNotFound(RuntimeError):
    """The requested data set is not on disk; the message says how to get it."""


@dataclass
class Data:
    train: Dataset
    test: Dataset
    classes: list[str]
    image_size: tuple[int, int]
    mean: tuple[float, ...] = CIFAR_MEAN
    std: tuple[float, ...] = CIFAR_STD
    source: str = ""


def eval_transform(image_size: tuple[int, int], mean, std, resize: bool) -> T.Compose:
    """Test-time preprocessing (also used by fastconv.predict): [resize], to tensor, normalise."""
    steps = [T.Resize(image_size)] if resize else []
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def train_transform(image_size: tuple[int, int], mean, std, resize: bool, crop_padding: int = 4, flip: bool = True,
                    rotation: float = 0.0, color_jitter: float = 0.0) -> T.Compose:
    steps = [T.Resize(image_size)] if resize else []
    if crop_padding > 0:
        steps.append(T.RandomCrop(image_size, padding=crop_padding, padding_mode="reflect"))
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if rotation > 0:
        steps.append(T.RandomRotation(rotation))
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


class SeededAugmentation(Dataset):
    """Applies `transform` to sample i of epoch e with torch's RNG seeded from (seed, e, i): the same
    augmentation whatever the number of loader workers, and after resuming from a checkpoint."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        key = hashlib.blake2b(f"{self.seed}/{self.epoch}/{index}".encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(key, "little") % 2**63)
            return self.transform(image), label


def _how_to_get(spec: str, root: Path) -> str:
    return (f"{spec} data not found under {root}. Download CIFAR-10 with `python -m fastconv.train --data cifar10 "
            f"--download --data-dir {root}`, point --data imagefolder:PATH at class-per-folder images "
            f"(PATH/train/<class>/*.png and PATH/test/<class>/*.png), or run offline on a generated "
            f"CIFAR-format set with --data synthetic.")


def _cifar10(root: Path, download: bool) -> tuple[Dataset, Dataset]:
    try:
        return (datasets.CIFAR10(str(root), train=True, download=download),
                datasets.CIFAR10(str(root), train=False, download=download))
    except RuntimeError as e:
        raise DataNotFound(_how_to_get("CIFAR-10", root) + f" (torchvision: {e})") from None


def _imagefolder(path: Path, seed: int) -> tuple[Dataset, Dataset, list[str]]:
    if not path.is_dir():
        raise DataNotFound(_how_to_get(f"imagefolder:{path}", path))
    test_dir = next((path / d for d in ("test", "val") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        train, test = datasets.ImageFolder(str(path / "train")), datasets.ImageFolder(str(test_dir))
        if train.classes != test.classes:
            raise ValueError(f"{path}: train and {test_dir.name} have different class folders")
        return train, test, train.classes
    full = datasets.ImageFolder(str(path))  # no split on disk: hold out every tenth image (seeded)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = max(1, len(full) // 10)
    return Subset(full, order[held_out:]), Subset(full, order[:held_out]), full.classes


def load(spec: str, root: str | Path, image_size: tuple[int, int], *, download: bool = False, seed: int = 0,
         augment: dict | None = None) -> Data:
    """Data set `spec` with training augmentation `augment` (train_transform's keywords), resized to
    `image_size` where its images differ (imagefolder images always are)."""
    root = Path(root).expanduser()
    if spec == "cifar10":
        train, test = _cifar10(root, download)
        classes, native = list(train.classes), (32, 32)
    elif spec == "synthetic":
        folder = root / "synthetic-cifar10"
        if not (folder / synthetic.FOLDER / synthetic.MANIFEST).exists():
            raise DataNotFound(f"no synthetic data under {folder} (write it with fastconv.train.synthetic.write)")
        train, test = synthetic.SyntheticCIFAR10(folder, True), synthetic.SyntheticCIFAR10(folder, False)
        classes, native = list(train.classes), (32, 32)
    elif spec.startswith("imagefolder:"):
        train, test, classes = _imagefolder(Path(spec.split(":", 1)[1]).expanduser(), seed)
        native = None
    else:
        raise ValueError(f"unknown --data {spec!r}; use cifar10, imagefolder:PATH or synthetic")
    resize = native != tuple(image_size)
    return Data(
        train=SeededAugmentation(train, train_transform(image_size, CIFAR_MEAN, CIFAR_STD, resize, **(augment or {})), seed),
        test=SeededAugmentation(test, eval_transform(image_size, CIFAR_MEAN, CIFAR_STD, resize), seed),
        classes=classes, image_size=tuple(image_size), source=spec,
    )


def prepare(spec: str, root: str | Path, *, download: bool, seed: int, synthetic_sizes: tuple[int, int],
            num_classes: int = 10) -> None:
    """What only one process should do before every process loads: download or generate."""
    root = Path(root).expanduser()
    if spec == "synthetic":
        synthetic.write(root / "synthetic-cifar10", *synthetic_sizes, num_classes=num_classes, seed=seed)
    elif spec == "cifar10" and download:
        _cifar10(root, True)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, sharded by rank) that can start part-way into an
    epoch, skipping the `start` first indices of this rank's shard (for resuming mid-epoch)."""

    start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return super().__len__() - self.start


class ShardSampler(Sampler):
    """Every world_size-th index from `rank`, in order: each test image is seen exactly once overall."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def loaders(data: Data, batch_size: int, rank: int, world_size: int, seed: int, workers: int,
            pin_memory: bool) -> tuple[DataLoader, DataLoader, ResumableSampler]:
    """(train loader, test loader, train sampler). Each loader draws its workers' base seed from its own
    generator, never from torch's global RNG (whose state the checkpoints restore for dropout)."""
    if len(data.train) < batch_size * world_size:
        raise ValueError(f"{len(data.train)} training images are fewer than one batch of {batch_size} per "
                         f"process x {world_size} processes")
    sampler = ResumableSampler(data.train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # No persistent workers: each epoch's iterator must copy SeededAugmentation.epoch into its workers.
    common = {"batch_size": batch_size, "num_workers": workers, "pin_memory": pin_memory}
    train = DataLoader(data.train, sampler=sampler, drop_last=True,
                       generator=torch.Generator().manual_seed(seed), **common)
    test = DataLoader(data.test, sampler=ShardSampler(len(data.test), rank, world_size),
                      generator=torch.Generator().manual_seed(seed + 1), **common)
    return train, test, sampler
