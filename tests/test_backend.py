"""Backend selection: fastconv.backend(...), FASTCONV_BACKEND, 'auto', and clear 'not supported' errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import fastconv
from fastconv import _backend
from fastconv.functional import conv2d


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert fastconv.current_backend() == "auto"


def test_context_manager_nests_and_restores():
    with fastconv.backend("torch"):
        assert fastconv.current_backend() == "torch"
        with fastconv.backend("triton"):
            assert fastconv.current_backend() == "triton"
        assert fastconv.current_backend() == "torch"


def test_env_var(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert fastconv.current_backend() == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="unknown fastconv backend 'nonsense'"):
        fastconv.current_backend()


def test_unknown_name():
    with pytest.raises(ValueError, match="choose one of"):
        with fastconv.backend("cudnn"):
            pass


def test_auto_picks_torch_for_cpu_and_triton_for_cuda():
    assert _backend.resolve("conv2d", torch.device("cpu"), ("triton", "torch"), "auto") == "torch"
    expected = "triton" if torch.cuda.is_available() else "torch"
    assert _backend.resolve("conv2d", torch.device("cuda"), ("triton", "torch"), "auto") == expected


def test_torch_backend_matches(device):
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with fastconv.backend("torch"):
        y = conv2d(x, w, None, 1, "same")
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, None, 1, "same"))


def test_extension_backends_explain_why():
    """'cuda' on CPU tensors always names the reason; 'cpu' runs where fastconv._C is built, else says why."""
    x, w = torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3)
    with fastconv.backend("cuda"):
        with pytest.raises(fastconv.BackendNotSupported, match="backend 'cuda' is not supported for cpu tensors"):
            conv2d(x, w)
    ok, why = _backend.extension_status("cpu")
    with fastconv.backend("cpu"):
        if ok:
            torch.testing.assert_close(conv2d(x, w), torch.nn.functional.conv2d(x, w))
        else:
            assert "fastconv._C" in why
            with pytest.raises(fastconv.BackendNotSupported, match=f"backend 'cpu' is not supported.*{re.escape(why[:30])}"):
                conv2d(x, w)


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, fastconv\n"
        "from fastconv.functional import conv2d\n"
        "try:\n"
        "    with fastconv.backend('triton'):\n"
        "        conv2d(torch.randn(1, 2, 4, 4), torch.randn(2, 2, 3, 3))\n"
        "except fastconv.BackendNotSupported as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED" in out.stdout, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "not supported for cpu tensors" in out.stdout


def test_info_cli_reports_backends():
    out = subprocess.run([sys.executable, "-m", "fastconv.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("torch ", "triton ", "backends for cuda tensors:", "backends for cpu tensors:", "conv2d",
                   "fastconv._C"):
        assert needle in out.stdout, needle


def test_info_reports_the_triton_host_path(monkeypatch):
    """fastconv.info says whether direct launches and C++ replays are on, and what turns them off."""
    from fastconv import _ext, info

    def line():
        return next(x for x in info.lines() if x.startswith("Triton host path:"))

    if _ext.load():
        assert line().endswith("on (FASTCONV_DIRECT_LAUNCH=0 turns them off)")
    else:
        assert "off (needs the extension" in line()
    monkeypatch.setenv("FASTCONV_DIRECT_LAUNCH", "0")
    assert "off (FASTCONV_DIRECT_LAUNCH=0" in line()


def test_environment_sets_unsets_and_restores(monkeypatch):
    """_backend.environment: a value sets, None unsets, and each variable is back as it was afterwards, after an
    exception too (the launch plan's GPU target, the overhead bench's switches)."""
    monkeypatch.setenv("FASTCONV_TEST_A", "before")
    monkeypatch.delenv("FASTCONV_TEST_B", raising=False)
    with pytest.raises(KeyError):
        with _backend.environment(FASTCONV_TEST_A=None, FASTCONV_TEST_B="1"):
            assert "FASTCONV_TEST_A" not in os.environ and os.environ["FASTCONV_TEST_B"] == "1"
            assert _backend.env_flag("FASTCONV_TEST_B", False)
            raise KeyError
    assert os.environ["FASTCONV_TEST_A"] == "before" and "FASTCONV_TEST_B" not in os.environ
