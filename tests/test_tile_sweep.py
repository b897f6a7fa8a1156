"""scripts/tile_sweep.py under the Triton interpreter, forcing tiles through the real API
(fastconv.triton.launch.forced), so the sweep's own logic -- planning, problems, float64 references, NaN
poisoning, reports -- runs on the real kernels at several real tiles."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="these sweeps run under the interpreter; on a GPU gpu_check.sh runs the sweep")


def _sweep_module():
    spec = importlib.util.spec_from_file_location("tile_sweep", ROOT / "scripts" / "tile_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def stand_in(monkeypatch):
    """The (family, tile) of every tuned launch while the sweep runs (a spy on the launch module's config
    construction): proof that the forced tiles reached the kernels."""
    from fastconv.triton import launch

    used = []
    real_call = launch.TunedKernel.__call__

    def spy(self, grid, *args, **kwargs):
        tile = launch._forced.get()
        if tile is not None:
            used.append((self.family, tuple(tile)))
        return real_call(self, grid, *args, **kwargs)

    monkeypatch.setattr(launch.TunedKernel, "__call__", spy)
    return used


def test_sweep_every_family_and_kind(stand_in, tmp_path):
    sweep = _sweep_module()
    rc = sweep.main(["--out", str(tmp_path), "--jobs", "0", "--max-tiles", "1", "--shape", "tiny"])
    doc = json.loads((tmp_path / "tile_sweep.json").read_text())
    bad = [r for r in doc["rows"] if r["status"] != "pass"]
    assert rc == 0 and not bad, bad
    assert doc["complete"] and doc["arch"] == "sm_80" and doc["interpreter"]
    from fastconv.triton.configs import CONFIGS, KINDS

    want = {(f, k, v, d) for f in CONFIGS for k in KINDS for v in sweep.FAMILY_VARIANTS[f]
            for d in sweep.KIND_DTYPES[k]}
    got = {(r["family"], r["kind"], r["variant"], r["dtype"]) for r in doc["rows"]}
    assert got == want
    # the launches really ran the forced tiles: every family's first tile of every kind
    first = {(f, tuple(CONFIGS[f][k]["sm_80"][0])) for f in CONFIGS for k in KINDS}
    assert first <= set(stand_in), f"a forced tile never reached a launch: used={sorted(set(stand_in))}"
    md = (tmp_path / "tile_sweep.md").read_text()
    assert "| family | pass | fail | not run |" in md and "| conv2d_fwd | 16 | 0 | 0 |" in md
    assert set(doc["summary"]) == set(CONFIGS)


def test_a_wrong_result_fails_its_row(stand_in, tmp_path, monkeypatch):
    """An output that is off under one tile shows up as FAIL for exactly that row."""
    sweep = _sweep_module()
    real_ns = torch.ops.fastconv
    calls = {"n": 0}

    class Ops:  # torch.ops.fastconv whose conv2d corrupts its 2nd result
        def __getattr__(self, name):
            return getattr(real_ns, name)

        @staticmethod
        def conv2d(*args):
            calls["n"] += 1
            y = real_ns.conv2d(*args)
            return y * 0.5 if calls["n"] == 2 else y

    monkeypatch.setattr(torch.ops, "fastconv", Ops())
    rc = sweep.main(["--out", str(tmp_path), "--jobs", "0", "--max-tiles", "2", "--shape", "tiny",
                     "--family", "conv2d_fwd", "--kind", "fp32", "--variant", "plain"])
    doc = json.loads((tmp_path / "tile_sweep.json").read_text())
    assert rc == 1 and [r["status"] for r in doc["rows"]] == ["pass", "FAIL"], doc["rows"]
    assert "| conv2d_fwd | 1 | 1 | 0 |" in (tmp_path / "tile_sweep.md").read_text()


def test_missing_forcing_api_exits_2(tmp_path, monkeypatch, capsys):
    import fastconv.triton as pkg

    monkeypatch.setitem(sys.modules, "fastconv.triton.launch", None)  # import raises ImportError
    monkeypatch.delattr(pkg, "launch", raising=False)
    rc = _sweep_module().main(["--out", str(tmp_path), "--jobs", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "fastconv.triton.launch" in err and "forced" in err
    doc = json.loads((tmp_path / "tile_sweep.json").read_text())  # the artefact exists and says why
    assert "forcing API is missing" in doc["error"] and doc["rows"] == []


def test_worker_processes_merge_their_rows(tmp_path):
    """--jobs 2: two worker processes (the GPU path) share the rows; the parent merges them into one report."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tile_sweep.py"), "--out", str(out), "--jobs", "2",
                           "--max-tiles", "2", "--shape", "tiny", "--family", "conv2d_dgrad", "--kind", "half"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "tile_sweep.json").read_text())
    assert len(doc["rows"]) == 2 * 2 * 2 and all(r["status"] == "pass" for r in doc["rows"]), doc["rows"]
    assert doc["summary"] == {"conv2d_dgrad": {"pass": 8, "fail": 0, "not_run": 0}}
    parts = sorted(p.name for p in (out / "tile_sweep_parts").iterdir())
    assert parts == ["worker-0.jsonl", "worker-0.log", "worker-1.jsonl", "worker-1.log"]
