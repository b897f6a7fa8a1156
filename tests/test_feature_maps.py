"""fastconv.feature_maps: hooked activations equal the layers' own outputs (plain and on fastconv's
kernels), and the CLI writes a PNG grid."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastconv import models
from fastconv.feature_maps import feature_maps, main

from .helpers import SESSION_SEED, assert_close, generator, randn


def test_feature_maps_are_the_layers_outputs():
    torch.manual_seed(SESSION_SEED)
    model = models.build("simple_cnn_bn", fastconv=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    x = randn((3, 32, 32), torch.float32, "cpu", generator("feature-maps"))
    layers = ["features.0", "features.2", "features.8"]
    maps = feature_maps(model, x, layers)
    with torch.no_grad():
        conv1 = model.features[0](x[None])
        relu1 = torch.relu(model.features[1](conv1))
        expected = {"features.0": conv1[0], "features.2": relu1[0], "features.8": model.features[:9](x[None])[0]}
    assert list(maps) == layers
    assert [tuple(m.shape) for m in maps.values()] == [(32, 32, 32), (32, 32, 32), (128, 8, 8)]
    fused = feature_maps(model, x, layers, fastconv=True)
    for name in layers:
        assert torch.equal(maps[name], expected[name]), name
        assert_close(fused[name], expected[name], torch.float32, f"{name} on fastconv")
    assert not model.features[0]._forward_hooks  # hooks removed afterwards
    with pytest.raises(ValueError, match="no layer named features.99"):
        feature_maps(model, x, ["features.99"])
    with pytest.raises(ValueError, match="do not output feature maps"):
        feature_maps(model, x, ["classifier.1"])


def test_feature_maps_cli_writes_png(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(SESSION_SEED).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "maps.png"
    main([str(image), "--model", "simple_cnn", "--channels", "8", "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    png = Image.open(out)
    assert png.format == "PNG" and png.width > 400 and png.height > 200  # 3 conv rows x 8 panels
    assert len(np.unique(np.asarray(png.convert("L")))) > 50  # not a blank canvas
