"""A dry run of scripts/gpu_check.sh in its no-GPU mode (CUDA hidden, the extension taken as built): it says it
is no GPU verification, exits 3, and leaves the artefacts a GPU run leaves -- at most 8 plain files, a summary
naming every step -- so the script's plumbing is proven before a GPU machine runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "build", "tile_sweep", "tests", "bench", "overhead", "profile")
ARTEFACTS = {"summary.md", "tests.xml", "bench.json", "bench.md", "tile_sweep.json", "tile_sweep.md",
             "overhead.md", "gpu_check.tar.gz"}
GPU_ONLY_ARTEFACTS = {"overhead.md"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER", "OUT", "GPU_CHECK_BUDGET")
           and not k.startswith("GPU_CHECK_TIMEOUT_")}
    env.update(PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp / "out"), GPU_CHECK_WORK=str(tmp / "work"),
               GPU_CHECK_SKIP_BUILD="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, tmp / "out"


@pytest.mark.slow
def test_exits_3_and_says_no_gpu(dry_run):
    proc, _ = dry_run
    assert proc.returncode == 3, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "This is NOT a GPU verification" in proc.stdout


@pytest.mark.slow
def test_leaves_the_artefacts(dry_run):
    proc, out = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert set(files) == ARTEFACTS - GPU_ONLY_ARTEFACTS and len(files) <= 8, files
    assert all((out / f).is_file() and not (out / f).is_symlink() for f in files)

    summary = (out / "summary.md").read_text()
    assert "NO GPU" in summary and "## Key figures" in summary
    for step in STEPS:
        assert f"| {step} |" in summary, f"step {step} missing from summary.md:\n{summary}"

    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert "- Tests: " in summary and " passed, 0 failed" in summary

    bench = json.loads((out / "bench.json").read_text())
    assert bench["set"] == "tiny" and bench["rows"]
    assert "| torch-eager |" in summary and "| conv2d |" in summary

    sweep = json.loads((out / "tile_sweep.json").read_text())
    assert "no GPU" in sweep["skipped"] and sweep["rows"] == []

    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    for log in ("steps.tsv", "env.log", "tests.log", "bench.log", "summary.md", "header.md"):
        assert f"gpu_check/{log}" in names, sorted(names)
    env_log = (out.parent / "work" / "gpu_check" / "env.log").read_text()
    assert "fastconv 0.1.0" in env_log and "torch " in env_log  # python -m fastconv.info ran


@pytest.fixture(scope="module")
def gpu_branch_run(tmp_path_factory):
    """gpu_check.sh with its GPU probe answered "9.0 <name>" by a wrapper around this Python (everything else is the
    real Python, on the CPU) and seconds-long step timeouts: the GPU-only steps' command lines must start and the
    artefacts must appear even when every step is cut short or fails."""
    tmp = tmp_path_factory.mktemp("gpu_branch")
    wrapper = tmp / "python"
    wrapper.write_text("#!/bin/bash\n"
                       'if [[ "$1" == "-c" && "$2" == *get_device_capability* ]]; then echo "9.0 PROBE-WRAPPER GPU"; '
                       "exit 0; fi\n"
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "PYTEST_XDIST_WORKER", "OUT", "GPU_CHECK_BUDGET", "TORCH_CUDA_ARCH_LIST")
           and not k.startswith("GPU_CHECK_TIMEOUT_")}
    # (the overhead step must finish: 60 s, as a loaded 2-core CI machine once took over 30 s on the oldest stack)
    env.update(PYTHON=str(wrapper), GPU_CHECK_OUT=str(tmp / "out"), GPU_CHECK_WORK=str(tmp / "work"),
               GPU_CHECK_SKIP_BUILD="1", CUDA_VISIBLE_DEVICES="", GPU_CHECK_TEST_WORKERS="1", GPU_CHECK_SWEEP_JOBS="1",
               GPU_CHECK_TIMEOUT_TESTS="15", GPU_CHECK_TIMEOUT_BENCH="10", GPU_CHECK_TIMEOUT_OVERHEAD="60",
               GPU_CHECK_TIMEOUT_PROFILE="5")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, tmp / "out", tmp / "work" / "gpu_check"


@pytest.mark.slow
def test_gpu_branch_commands_start_and_leave_artefacts(gpu_branch_run):
    proc, out, logs = gpu_branch_run
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]  # nothing can pass without a GPU
    assert "GPU: PROBE-WRAPPER GPU (compute capability 9.0)" in proc.stdout
    files = {p.name for p in out.iterdir()}
    assert {"summary.md", "tests.xml", "tile_sweep.json", "tile_sweep.md", "gpu_check.tar.gz"} <= files <= ARTEFACTS
    summary = (out / "summary.md").read_text()
    assert "TORCH_CUDA_ARCH_LIST=9.0" in summary
    for step in ("tile_sweep", "tests", "bench", "overhead", "profile"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| {step} |"))
        assert "SKIPPED" not in row, row  # the GPU branch ran it
    assert "Tile sweep: NOT RUN: no GPU" in summary  # the sweep itself refused, and said why
    # each GPU step's command really started: pytest with the GPU selection, the check bench set, the trainer
    tests_log = (logs / "tests.log").read_text()
    assert "FASTCONV_AUTOTUNE=0" in proc.stdout and "--deselect tests/test_triton_max_pool2d.py" in proc.stdout
    assert "error: unrecognized arguments" not in tests_log and "ERROR: file or directory not found" not in tests_log
    ET.parse(out / "tests.xml")  # a junit file even when cut short
    bench_log = (logs / "bench.log").read_text()
    assert "error: unrecognized arguments" not in bench_log and "ERROR: file or directory not found" not in bench_log
    assert "FASTCONV_BENCH_SET=check" in proc.stdout
    profile_log = (logs / "profile.log").read_text()
    assert "error: unrecognized arguments" not in profile_log and "invalid choice" not in profile_log
    # the overhead step ran both harnesses (here on the CPU: its dry-run rows) and left overhead.md
    overhead_log = (logs / "overhead.log").read_text()
    assert "error:" not in overhead_log and "Traceback" not in overhead_log, overhead_log[-3000:]
    assert "overhead.md" in files and "- Host overhead per call" in summary and "| max_pool2d | fwd |" in summary
    assert (logs / "overhead" / "launch_binding.md").is_file()
