"""python -m fastconv.train end to end on CPU with tiny generated CIFAR-format data: the data format,
plain vs fastconv losses, exact resumption, metrics.json, a 2-process torchrun (gloo) run, the profiler,
AMP + channels_last, class-per-folder images, and the message when data is missing."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR10

from fastconv import models
from fastconv.train import main, metrics, synthetic

TRAIN, TEST = 32, 24  # synthetic images: 4 steps per epoch at batch 8
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write(root / "synthetic-cifar10", TRAIN, TEST, seed=0)
    return root


def _run(data_dir, out=None, *extra):
    argv = ["--data", "synthetic", "--data-dir", str(data_dir), "--synthetic-train", str(TRAIN),
            "--synthetic-test", str(TEST), "--batch-size", "8", "--workers", "0", "--no-progress",
            "--device", "cpu", "--lr", "0.02", *extra]
    if out is not None:
        argv += ["--out", str(out)]
    return main(argv)


def test_synthetic_data_is_in_torchvision_cifar10_format(tmp_path):
    folder = synthetic.write(tmp_path, 25, 7, num_classes=4, seed=3)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        synthetic.TRAIN_FILES + ["test_batch", "batches.meta", synthetic.MANIFEST])
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # as torchvision reads it
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (5, 3072) and len(batch["labels"]) == 5
    train = synthetic.SyntheticCIFAR10(tmp_path, train=True)
    test = synthetic.SyntheticCIFAR10(tmp_path, train=False)
    assert isinstance(train, CIFAR10) and len(train) == 25 and len(test) == 7
    assert train.classes == ["pattern_0", "pattern_1", "pattern_2", "pattern_3"]
    image, label = train[0]
    assert image.size == (32, 32) and 0 <= label < 4
    # torchvision's own class checks the real archive's md5 sums, which generated files cannot match ...
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR10(str(tmp_path), train=True)
    # ... the subclass checks the sums recorded at generation, so corruption is still caught.
    with open(folder / "data_batch_2", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        synthetic.SyntheticCIFAR10(tmp_path, train=True)


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "cifar10", "--data-dir", str(tmp_path), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--download" in err and "--data synthetic" in err and "imagefolder:PATH" in err


def test_plain_and_fastconv_losses_agree(data_dir):
    common = ["--model", "simple_cnn_bn", "--epochs", "1", "--max-steps", "3"]
    plain = _run(data_dir, None, *common, "--no-fastconv")
    fused = _run(data_dir, None, *common, "--fastconv")
    assert plain["fastconv"] is False and fused["fastconv"] is True
    assert len(plain["train_loss"]) == len(fused["train_loss"]) == 3
    assert plain["train_loss"][0] != plain["train_loss"][-1]
    np.testing.assert_allclose(fused["train_loss"], plain["train_loss"], rtol=1e-4)
    assert abs(fused["test_loss"] - plain["test_loss"]) <= 1e-4 * max(1.0, plain["test_loss"])


def test_resume_continues_exactly_and_checkpoint_loads_into_the_plain_model(data_dir, tmp_path):
    """A run stopped mid-epoch (--max-steps 3) and resumed -- with a loader worker this time -- gives
    the uninterrupted run's loss sequence (augmentation, shuffling, dropout, BN, optimizer, schedule)."""
    common = ["--model", "simple_cnn_bn", "--epochs", "2", "--schedule", "onecycle"]
    whole = _run(data_dir, tmp_path / "whole", *common)
    first = _run(data_dir, tmp_path / "split", *common, "--max-steps", "3")
    assert first["steps"] == 3 and first["epochs"][0]["partial"]
    resumed = _run(data_dir, tmp_path / "split", *common, "--resume", "--workers", "1")
    assert len(whole["train_loss"]) == 2 * TRAIN // 8
    assert resumed["train_loss"] == whole["train_loss"]
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert [e["train_loss"] for e in resumed["epochs"]] == [e["train_loss"] for e in whole["epochs"]]

    state = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["model_name"]) == (2, 2 * TRAIN // 8, "simple_cnn_bn")
    plain = models.build("simple_cnn_bn", num_classes=10, fastconv=False)
    plain.load_state_dict(state["model"])  # strict: the converted model's keys are the plain model's
    assert {"optimizer", "scheduler", "scaler", "rng", "class_names", "normalization", "input_size"} <= set(state)


def test_metrics_json_is_complete(data_dir, tmp_path):
    _run(data_dir, tmp_path, "--model", "lenet5", "--epochs", "2", "--max-steps", "6", "--schedule", "cosine")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert len(m["train_loss"]) == 6 and m["steps"] == 6 and m["epochs_completed"] == 1
    assert [e["epoch"] for e in m["epochs"]] == [1, 2] and m["epochs"][1]["partial"]
    for e in m["epochs"]:
        assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second", "lr"} <= set(e)
        assert e["images_per_second"] > 0
    matrix = np.array(m["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == TEST
    assert m["test_accuracy"] == pytest.approx(np.trace(matrix) / TEST)
    assert [c["class"] for c in m["per_class"]] == m["classes"] == [f"pattern_{i}" for i in range(10)]
    for i, c in enumerate(m["per_class"]):
        assert c["support"] == matrix[i].sum()
        assert c["recall"] == pytest.approx(matrix[i, i] / matrix[i].sum() if matrix[i].sum() else 0.0)
        assert c["precision"] == pytest.approx(matrix[i, i] / matrix[:, i].sum() if matrix[:, i].sum() else 0.0)
    assert m["images_per_second"] == m["epochs"][-1]["images_per_second"]
    assert m["device"].startswith("cpu") and m["world_size"] == 1
    assert {"python", "torch", "torchvision", "triton", "fastconv"} <= set(m["versions"])
    assert m["model"] == "lenet5" and m["amp"] == "none" and m["args"]["schedule"] == "cosine"
    assert m["channels_last"] is False and m["args"]["channels_last"] is False  # the default on CPU


def test_channels_last_flag_defaults_to_the_device():
    """--channels-last / --no-channels-last, or unset: resolved by the engine (on for CUDA, off on CPU)."""
    from fastconv.train import cli

    p = cli.parser()
    assert p.parse_args([]).channels_last is None
    assert p.parse_args(["--channels-last"]).channels_last is True
    assert p.parse_args(["--no-channels-last"]).channels_last is False


def test_per_class_metrics_by_hand():
    matrix = torch.tensor([[2, 1, 0], [0, 3, 0], [0, 0, 0]])  # rows: true class, columns: predicted
    rows = metrics.per_class(matrix, ["a", "b", "c"])
    assert rows[0] == {"class": "a", "precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert rows[1]["precision"] == 0.75 and rows[1]["recall"] == 1.0 and rows[1]["f1"] == pytest.approx(6 / 7)
    assert rows[2] == {"class": "c", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics.accuracy(matrix) == pytest.approx(5 / 6)
    assert torch.equal(metrics.confusion_matrix(torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 1, 1]), 3), matrix)


def test_torchrun_two_processes_gloo(data_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastconv.train",
           "--data", "synthetic", "--data-dir", str(data_dir), "--synthetic-train", str(TRAIN), "--synthetic-test",
           str(TEST), "--model", "lenet5", "--batch-size", "4", "--epochs", "1", "--max-steps", "3", "--workers", "0",
           "--device", "cpu", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 3 and len(m["train_loss"]) == 3
    assert np.array(m["confusion_matrix"]).sum() == TEST  # each test image evaluated once across the ranks
    assert m["epochs"][0]["images_per_second"] > 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert len(state["rng"]) == 2  # each rank's RNG state, for an exact resume
    models.build("lenet5", fastconv=False).load_state_dict(state["model"])
    assert "epoch 1: train loss" in proc.stderr and proc.stderr.count("epoch 1: train loss") == 1  # rank 0 only


def test_profile_shows_fastconv_ops(data_dir, tmp_path, capsys):
    # an explicit backend: under 'auto', CPU tensors run exactly nn's PyTorch ops (no fastconv op to show)
    result = _run(data_dir, None, "--model", "simple_cnn_bn", "--epochs", "1", "--profile", str(tmp_path),
                  "--profile-wait", "1", "--profile-warmup", "1", "--profile-active", "1", "--backend", "torch")
    assert result["steps"] == 3  # the profiled run stops after wait + warm-up + active steps
    table = capsys.readouterr().out
    assert "fastconv::conv_bn_act_train" in table and "fastconv.train.forward" in table
    traces = list(tmp_path.glob("*.pt.trace.json"))
    assert len(traces) == 1
    trace = traces[0].read_text()
    json.loads(trace)  # Chrome trace JSON, as Perfetto and TensorBoard read it
    for name in ("fastconv::conv_bn_act_train", "fastconv::max_pool2d", "fastconv.train.backward",
                 "fastconv.train.optimizer_step"):
        assert name in trace, name
    assert "fastconv::conv_bn_act_train" in (tmp_path / "top_ops_rank0.txt").read_text()


def test_bf16_autocast_and_channels_last(data_dir):
    result = _run(data_dir, None, "--model", "simple_cnn_bn", "--epochs", "1", "--max-steps", "2", "--amp", "bf16",
                  "--channels-last")
    assert len(result["train_loss"]) == 2 and all(np.isfinite(result["train_loss"]))
    assert result["amp"] == "bf16" and result["channels_last"]


@pytest.mark.parametrize("mode", ["reduce-overhead"])
def test_compile_mode_matches_eager(data_dir, monkeypatch, mode):
    """--compile MODE: the compiled model (Inductor, fastconv's ops opaque to it) trains and evaluates like eager.
    On CPU reduce-overhead compiles without CUDA graphs, and no step is marked for them. Inductor's own dropout
    RNG differs from eager's: fallback_random makes the runs comparable."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    common = ["--model", "simple_cnn_bn", "--epochs", "1", "--max-steps", "2"]
    eager = _run(data_dir, None, *common)
    compiled = _run(data_dir, None, *common, "--compile", mode)
    assert compiled["compile"] == mode and eager["compile"] is None
    np.testing.assert_allclose(compiled["train_loss"], eager["train_loss"], rtol=1e-5)
    assert abs(compiled["test_loss"] - eager["test_loss"]) <= 1e-5 * max(1.0, eager["test_loss"])
    assert marks == []


def test_cuda_graph_modes_mark_each_step(monkeypatch):
    """With a CUDA-graph mode on a GPU every forward (training and evaluation) first marks a new CUDA-graph step,
    so that the replayed graphs may reuse their output buffers; otherwise nothing is marked. (Mocked: a compiled
    step on a GPU is tests/test_compile.py's; the GPU check's test step has no time for another Inductor run.)"""
    from types import SimpleNamespace

    from fastconv.train import cli, engine

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    assert set(cli.CUDA_GRAPH_MODES) <= set(cli.COMPILE_MODES)
    for graphs in (True, False):
        marks.clear()
        run = SimpleNamespace(cuda_graphs=graphs, wrapped=lambda x: x + 1)
        assert engine.Run._forward(run, torch.ones(1)).item() == 2
        assert marks == ([1] if graphs else [])
    assert parser_compile(["--compile"]) == "default" and parser_compile([]) is None
    assert parser_compile(["--compile", "reduce-overhead"]) == "reduce-overhead"
    with pytest.raises(SystemExit):
        parser_compile(["--compile", "fast"])


def parser_compile(argv):
    from fastconv.train import parser

    return parser().parse_args(argv).compile


def test_imagefolder_data(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cats", "dogs"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, size=(20 + i, 30, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    result = main(["--data", f"imagefolder:{tmp_path}", "--model", "lenet5", "--epochs", "1", "--batch-size", "4",
                   "--workers", "0", "--no-progress", "--device", "cpu"])
    assert result["classes"] == ["cats", "dogs"] and result["steps"] == 2
    assert np.array(result["confusion_matrix"]).sum() == 8
