"""python -m fastconv.predict on generated PNGs of odd sizes: resize, normalise, batch, class names and
probabilities equal to the plain model's softmax on the same preprocessing done by hand."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastconv import models, predict
from fastconv.train import checkpoint

from .helpers import SESSION_SEED

CLASSES = ["circle", "square", "triangle"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture
def checkpoint_path(tmp_path):
    torch.manual_seed(SESSION_SEED)
    model = models.build("simple_cnn_bn", num_classes=3, fastconv=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "checkpoint.pt"
    checkpoint.save(path, {"model": model.state_dict(), "model_name": "simple_cnn_bn", "num_classes": 3,
                           "class_names": CLASSES, "input_size": [3, 32, 32],
                           "normalization": {"mean": MEAN, "std": STD}})
    return path, model.eval()


def _png(path, height, width, seed, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").convert(mode).save(path)
    return path


def _by_hand(path):
    image = Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def test_predict_cli_prints_class_names_and_probabilities(checkpoint_path, tmp_path, capsys):
    path, plain = checkpoint_path
    images = [_png(tmp_path / "a.png", 45, 61, SESSION_SEED), _png(tmp_path / "b.png", 32, 32, SESSION_SEED + 1, "L")]
    results = predict.main(["--checkpoint", str(path), "--top", "3", *map(str, images)])
    out = capsys.readouterr().out.splitlines()
    assert len(results) == len(out) == 2
    batch = torch.stack([_by_hand(p) for p in images])
    with torch.no_grad():
        expected = torch.softmax(plain(batch), dim=1)
    for image, result, line, probs in zip(images, results, out, expected):
        assert [name for name, _ in result] == [CLASSES[i] for i in probs.argsort(descending=True).tolist()]
        # torchvision's Resize antialiases; PIL's bilinear resize by hand agrees to within its rounding.
        np.testing.assert_allclose([p for _, p in result], probs.sort(descending=True).values.tolist(), atol=2e-2)
        assert line.startswith(f"{image}: {result[0][0]} ") and line.count("%") == 3
    assert sum(p for _, p in results[0]) == pytest.approx(1.0, abs=1e-5)


def test_predict_fastconv_equals_plain(checkpoint_path, tmp_path):
    path, _ = checkpoint_path
    image = _png(tmp_path / "c.png", 50, 40, SESSION_SEED + 2)
    fused = predict.predict(path, [image], top=3, fastconv=True)[0]
    plain = predict.predict(path, [image], top=3, fastconv=False)[0]
    assert [n for n, _ in fused] == [n for n, _ in plain]
    np.testing.assert_allclose([p for _, p in fused], [p for _, p in plain], atol=1e-5)


def test_predict_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        predict.predict(tmp_path / "nope.pt", [])
