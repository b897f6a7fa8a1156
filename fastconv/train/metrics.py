"""Classification metrics from a confusion matrix, run metadata, and metrics.json."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def confusion_matrix(target: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[i, j] = images of class i predicted as class j."""
    flat = target.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class(matrix: torch.Tensor, classes: list[str]) -> list[dict]:
    """Precision, recall and F1 of each class (0 where undefined: no predictions or no images)."""
    m = matrix.double()
    tp, predicted, actual = m.diag(), m.sum(0), m.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    return [{"class": name, "precision": p, "recall": r, "f1": f, "support": int(s)}
            for name, p, r, f, s in zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), actual.tolist())]


def accuracy(matrix: torch.Tensor) -> float:
    total = int(matrix.sum())
    return float(matrix.diag().sum()) / total if total else 0.0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: report as unknown
        return None


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": _version("torchvision"),
            "triton": _version("triton"), "fastconv": _version("fastconv"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write(path: str | Path, metrics: dict) -> None:
    Path(path).write_text(json.dumps(metrics, indent=1))
