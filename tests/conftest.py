"""Test set-up: without a CUDA device, the real Triton kernels run on CPU tensors through the Triton
interpreter (TRITON_INTERPRET=1 must be set before triton compiles any @triton.jit function)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# On a GPU the suite picks tiles by the documented heuristic (fast, deterministic); the autotuned path is
# exercised by the benchmarks, and under the interpreter by FASTCONV_INTERPRET_AUTOTUNE (tests/test_launch.py).
os.environ.setdefault("FASTCONV_AUTOTUNE", "0")

import pytest  # noqa: E402

from .backends import KERNEL_BACKENDS, skip_unless_runnable, tensor_device  # noqa: E402


def _set_interpreter_overflow_checks(on: bool) -> None:
    """Triton's interpreter recomputes every int32 add/sub/mul in int64 for an overflow check (sanitize_overflow,
    on by default), but asserts the result only with debug=True, which is off by default: half of its run time went
    to checks that could never fail. Here the tests marked `sanitize_overflow` (IDX64 paths, max-pool geometries) run
    with both on, so an int32 overflow in the kernels' index arithmetic fails them; the rest run with both off."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import dataclasses

    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    if builder.options.sanitize_overflow != on or builder.options.debug != on:
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=on, debug=on)


@pytest.fixture(autouse=True)
def _interpreter_overflow_checks(request):
    _set_interpreter_overflow_checks(request.node.get_closest_marker("sanitize_overflow") is not None)
    yield


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels under test run: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend():
    """Run the test on fastconv's Triton kernels, fp32 without TF32 (TF32 has tests of its own)."""
    import fastconv

    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with fastconv.backend("triton"):
        yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """The kernels under test (triton / cpu / cuda), in force for the whole test (tensors go to `kdevice`)."""
    import fastconv

    skip_unless_runnable(request.param)
    with fastconv.backend(request.param):
        yield request.param


@pytest.fixture
def kdevice(kernel_backend, device):
    return tensor_device(kernel_backend, device)
