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


# The slow tier (deselected by default through pyproject's addopts; `pytest -m slow` runs it, the GPU check runs it
# on the GPU): parametrizations whose path a cheaper sibling in the default tier already covers, kept for breadth.
# Each entry is a node-id prefix. The default tier keeps, per test: every dtype/activation/geometry family at least
# once on the interpreter, every op's opcheck and gradcheck, every compile smoke test of the fastconv op kinds.
SLOW_TIER = (
    # torch.compile(fullgraph) training: cifar10_cnn and simple_cnn_bn stay
    "tests/test_compile.py::test_models_compile_fullgraph_training[neuralnet]",
    "tests/test_compile.py::test_models_compile_fullgraph_training[simple_cnn]",
    "tests/test_compile.py::test_models_compile_fullgraph_training[resnet]",
    "tests/test_compile.py::test_models_compile_fullgraph_training[alexnet]",
    "tests/test_compile.py::test_models_compile_fullgraph_training[lenet5]",
    "tests/test_compile.py::test_models_compile_fullgraph_training[vgg16]",
    "tests/test_compile.py::test_converted_torchvision_compiles_fullgraph[",  # whole torchvision models
    # one drop-in model per layout stays (NCHW implicit, channels_last im2col)
    "tests/test_modules.py::test_drop_in_model_forward_backward[False-im2col]",
    "tests/test_modules.py::test_drop_in_model_forward_backward[True-implicit]",
    # whole torchvision models in float64: resnet18, alexnet, googlenet, squeezenet and the *_head cases stay
    "tests/test_convert.py::test_structure_and_checkpoints[vgg11_bn]",
    "tests/test_convert.py::test_eval_matches_original[mobilenet_v2_head]",
    "tests/test_convert.py::test_train_step_matches_original[alexnet_like]",
    "tests/test_convert.py::test_train_step_matches_original[mobilenet_v2]",
    "tests/test_convert.py::test_train_step_matches_original[vgg11_bn]",
    "tests/test_convert.py::test_train_step_matches_original[mobilenet_v3_small]",
    # fused block vs nn.Sequential on Triton: each activation once, each algo three times (the C++ twins run all)
    "tests/test_conv_bn_act.py::test_train_mode_matches_sequential[triton-hardswish-im2col]",
    "tests/test_conv_bn_act.py::test_train_mode_matches_sequential[triton-identity-implicit]",
    "tests/test_conv_bn_act.py::test_train_mode_matches_sequential[triton-relu-im2col]",
    "tests/test_conv_bn_act.py::test_train_mode_matches_sequential[triton-relu6-implicit]",
    "tests/test_conv_bn_act.py::test_train_mode_matches_sequential[triton-silu-implicit]",
    # the wgrad epilogue: every geometry x split count in fp32 (dtype0); fp16 / bf16 on the default split count
    *(f"tests/test_fewer_launches.py::test_wgrad_epilogue_matches_float64[geo{g}-{s}-dtype{d}]"
      for g in (0, 1) for s in (1, 3) for d in (1, 2)),
    "tests/test_launch.py::test_finalize_tree_matches_float64[70000]",
    # the dgrad's add epilogue: in fp16 one case stays; in fp32 every layout, stride, groups and bits case into a
    # new dx, the NaN-poisoned out only with a channels_last t
    *(f"tests/test_conv2d.py::test_dgrad_add_epilogue[{b}-{s}-{g}-{t}-{o}-{d}]"
      for b in ("add", "add_bits") for s in (1, 2) for g in (1, 2) for t in ("channels_last", "NCHW", "expanded")
      for o in ("new", "nan") for d in ("fp32", "fp16")
      if ((b, s, g, t, o) != ("add_bits", 2, 1, "channels_last", "new") if d == "fp16"
          else (o == "nan" and t != "channels_last"))),
    # every tile the autotuner may try on the training block: implicit with a float momentum stays (~65 s each)
    "tests/test_launch.py::test_emulated_autotune_training_block[implicit-None]",
    # and of the wgrad epilogue's and the fused pool's blocks (~55 s each; the chain's and the block's above stay)
    "tests/test_fewer_launches.py::test_emulated_autotune",
    "tests/test_batch_norm_act_pool.py::test_emulated_autotune",
    "tests/test_launch.py::test_emulated_autotune_training_block[im2col-0.1]",
    "tests/test_convert.py::test_train_step_matches_original[mobilenet_v2_head]",
    "tests/test_convert.py::test_train_step_matches_original[resnet18_head]",  # 5000 rows already take three tree levels
    "tests/test_prologue.py::test_gradcheck[silu-hardswish]",
    "tests/test_batch_norm_act_pool.py::test_fused_sequential_pools_pending_blocks[nchw]",
    # the ahead-of-time Triton kernel report and the tile sweep's CPU test: CI's oldest-stack leg runs them on
    # triton 3.6, the lent GPU image's compiler (register and spill counts differ between Triton versions)
    "tests/test_kernel_report.py::",
    "tests/test_tile_sweep.py::",
    "tests/test_compile.py::test_cumulative_momentum_has_no_host_sync[triton]",  # [cpu] stays: the same tracing
    "tests/test_convert.py::test_train_step_matches_original[alexnet]",
    "tests/test_convert.py::test_train_step_matches_original[googlenet]",
    "tests/test_convert.py::test_train_step_matches_original[squeezenet1_0]",
    "tests/test_convert.py::test_structure_and_checkpoints[googlenet]",
    # the named edge-case geometries run on the implicit GEMM (the im2col path shares their index math through
    # its gather kernel, and runs five random geometries below)
    "tests/test_conv2d.py::test_named_configs[triton-im2col-",
    # random geometries: five per algo on Triton (the named configs cover the edge cases)
    *(f"tests/test_conv2d.py::test_random_configs[triton-{a}-{i}]" for a in ("implicit", "im2col") for i in range(5, 10)),
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.startswith(SLOW_TIER):
            item.add_marker(pytest.mark.slow)


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
