// The extension module fastconv._C. Importing it loads this library, whose static initialisers register the
// torch.ops.fastconv.ext_* ops (csrc/<op>.cpp schemas, csrc/cpu and csrc/cuda kernels); the module's functions
// are their direct Python entry points: fastconv._C.ext_conv2d(...) etc. Each calls the registered op through
// the C++ dispatcher (typed handle found once), so device dispatch, the profiler's records and Python dispatch
// modes behave exactly as for torch.ops.fastconv.ext_*; what it skips is torch.ops' generic Python argument
// parsing against the schema, about 4 µs per call (bench/bench_overhead.py). fastconv's eager fast path calls
// these (fastconv/_ext.py); tracing and torch.compile only ever see the Python custom ops around them.
//
// The one translation unit with pybind11: it includes only the dispatcher and torch's pybind11 type casters,
// not <torch/extension.h> (all of libtorch's C++ API), which doubled its compile time.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "fastconv/batch_norm.h"
#include "fastconv/dry_run.h"
#include "fastconv/epilogue.h"
#include "conv2d.h"
#include "conv_bn_act.h"
#include "ext_ops.h"
#include "triton_conv2d.h"
#include "triton_conv_bn_act.h"
#include "triton_launch.h"

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#ifdef FASTCONV_WITH_CUDA
// Defined in csrc/cuda/build_info.cu (compiled by nvcc): the toolkit and the architectures it targeted.
extern "C" const char* fastconv_cuda_build_info();
#endif

namespace {

std::string build_info() {
  std::string json = "{\"cuda\": ";
#ifdef FASTCONV_WITH_CUDA
  json += "true, ";
  json += fastconv_cuda_build_info();  // "\"cuda_version\": ..., \"nvcc\": ..., \"archs\": [...]"
#else
  json += "false, \"cuda_version\": null, \"nvcc\": null, \"archs\": []";
#endif
#if defined(__clang__)
  json += ", \"cxx\": \"clang " __clang_version__ "\"";
#elif defined(__GNUC__)
  json += ", \"cxx\": \"gcc " __VERSION__ "\"";
#else
  json += ", \"cxx\": \"unknown\"";
#endif
  // Constants the Python side needs for the ops' fake kernels (shapes of the statistics partials).
  json += ", \"stats_rows\": " + std::to_string(fastconv::kStatsRows);
  json += ", \"bn_tile_rows\": {\"cpu\": " + std::to_string(fastconv::kBnTileRowsCpu) +
          ", \"cuda\": " + std::to_string(fastconv::kBnTileRowsCuda) + "}";
  json += "}";
  return json;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastconv, m) {
  m.def("ext_build_info() -> str", &build_info);
}

namespace fastconv {

using namespace ext;  // the signatures and FASTCONV_HANDLE (csrc/ext_ops.h)

namespace {

// (internal linkage: pybind11's types are hidden, a class_ of a visible type warns)
struct PoolGeometry {
  PoolGeometry(std::vector<int64_t> k, std::vector<int64_t> s, std::vector<int64_t> p, std::vector<int64_t> d,
               bool ceil)
      : kernel_size(std::move(k)), stride(std::move(s)), padding(std::move(p)), dilation(std::move(d)),
        ceil_mode(ceil) {}
  std::vector<int64_t> kernel_size, stride, padding, dilation;
  bool ceil_mode;
};

}  // namespace

static void bind_ops(pybind11::module_& m) {
  namespace py = pybind11;
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("_set_dry_run", [](bool on) { dry_run_flag().store(on); },
        "CPU kernels check and allocate, then skip their arithmetic (the host-overhead benchmark only)");
  m.def("_dry_run", []() { return dry_run(); });
  m.def(
      "ext_conv2d",
      [](const Tensor& input, const Tensor& weight, const OptTensor& bias, std::vector<int64_t> stride,
         std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, const OptTensor& scale,
         const OptTensor& shift, const OptTensor& residual, int64_t activation, bool stats, bool allow_tf32,
         Tensor out) {
        FASTCONV_HANDLE(Conv2dFn, "fastconv::ext_conv2d");
        return op.call(input, weight, bias, stride, padding, dilation, groups, scale, shift, residual, activation,
                       stats, allow_tf32, out);
      },
      release);
  m.def(
      "ext_conv2d_input_grad",
      [](const Tensor& grad_output, const Tensor& weight, std::vector<int64_t> stride, std::vector<int64_t> padding,
         std::vector<int64_t> dilation, int64_t groups, bool allow_tf32, Tensor out) {
        FASTCONV_HANDLE(Conv2dInputGradFn, "fastconv::ext_conv2d_input_grad");
        op.call(grad_output, weight, stride, padding, dilation, groups, allow_tf32, out);
      },
      release);
  m.def(
      "ext_conv2d_weight_grad",
      [](const Tensor& grad_output, const Tensor& input, std::vector<int64_t> weight_size,
         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups,
         bool bias_grad, bool allow_tf32) {
        FASTCONV_HANDLE(Conv2dWeightGradFn, "fastconv::ext_conv2d_weight_grad");
        return op.call(grad_output, input, weight_size, stride, padding, dilation, groups, bias_grad, allow_tf32);
      },
      release);
  m.def(
      "ext_batch_norm_stats",
      [](const Tensor& z) {
        FASTCONV_HANDLE(BnStatsFn, "fastconv::ext_batch_norm_stats");
        return op.call(z);
      },
      release);
  m.def(
      "ext_batch_norm_finalize",
      [](const Tensor& count, const Tensor& mean, const Tensor& m2, const OptTensor& bias,
         const OptTensor& running_mean, const OptTensor& running_var, double momentum,
         const OptTensor& momentum_tensor, const OptTensor& num_batches_tracked, int64_t values) {
        FASTCONV_HANDLE(BnFinalizeFn, "fastconv::ext_batch_norm_finalize");
        return op.call(count, mean, m2, bias, running_mean, running_var, momentum, momentum_tensor,
                       num_batches_tracked, values);
      },
      py::arg("count"), py::arg("mean"), py::arg("m2"), py::arg("bias"), py::arg("running_mean") = py::none(),
      py::arg("running_var") = py::none(), py::arg("momentum") = 0.1, py::arg("momentum_tensor") = py::none(),
      py::arg("num_batches_tracked") = py::none(), py::arg("values") = 0, release);
  m.def(
      "ext_batch_norm_act",
      [](const Tensor& z, const Tensor& mean, const Tensor& var, const OptTensor& weight, const OptTensor& bias,
         const OptTensor& residual, double eps, const std::string& activation) {
        FASTCONV_HANDLE(BnActFn, "fastconv::ext_batch_norm_act");
        return op.call(z, mean, var, weight, bias, residual, eps, activation);
      },
      release);
  m.def(
      "ext_batch_norm_act_backward",
      [](const Tensor& grad_y, const Tensor& z, const Tensor& mean, const Tensor& var, const OptTensor& weight,
         const OptTensor& bias, const OptTensor& residual, double eps, const std::string& activation,
         bool want_grad_residual) {
        FASTCONV_HANDLE(BnActBackwardFn, "fastconv::ext_batch_norm_act_backward");
        return op.call(grad_y, z, mean, var, weight, bias, residual, eps, activation, want_grad_residual);
      },
      release);
  m.def("conv2d_train", &conv2d_train_eager,
        "the eager fast path of fastconv::conv2d without an epilogue on backends cpu / cuda: z, one C++ autograd "
        "node (csrc/conv2d.cpp)",
        release);
  m.def("conv_bn_act_train", &conv_bn_act_train_eager,
        "the eager fast path of fastconv::conv_bn_act_train on backends cpu / cuda: (y, z, mean, var), one C++ "
        "autograd node (csrc/conv_bn_act.cpp)",
        release);
  m.def(
      "ext_max_pool2d",
      [](const Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
         std::vector<int64_t> padding, std::vector<int64_t> dilation, bool ceil_mode, bool offsets) {
        FASTCONV_HANDLE(MaxPoolFn, "fastconv::ext_max_pool2d");
        return op.call(input, kernel_size, stride, padding, dilation, ceil_mode, offsets);
      },
      py::arg("input"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
      py::arg("ceil_mode"), py::arg("offsets") = true, release);
  // A max-pool layer's no-grad call in eager mode (functional.max_pool2d's per-signature plan): the geometry is
  // converted from Python once, into a PoolGeometry, and only y comes back (no offsets, no tuple).
  py::class_<PoolGeometry>(m, "PoolGeometry")
      .def(py::init<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, bool>(),
           py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("ceil_mode"));
  m.def(
      "ext_max_pool2d_planned",
      [](const Tensor& input, const PoolGeometry& g) {
        FASTCONV_HANDLE(MaxPoolFn, "fastconv::ext_max_pool2d");
        return std::get<0>(op.call(input, g.kernel_size, g.stride, g.padding, g.dilation, g.ceil_mode, false));
      },
      "ext_max_pool2d(input, *geometry, offsets=False)[0]", release);
  m.def(
      "ext_max_pool2d_input_grad",
      [](const Tensor& grad_output, const Tensor& offsets, std::vector<int64_t> input_size,
         std::vector<int64_t> kernel_size, std::vector<int64_t> stride, std::vector<int64_t> padding,
         std::vector<int64_t> dilation, bool ceil_mode, bool channels_last) {
        FASTCONV_HANDLE(MaxPoolInputGradFn, "fastconv::ext_max_pool2d_input_grad");
        return op.call(grad_output, offsets, input_size, kernel_size, stride, padding, dilation, ceil_mode,
                       channels_last);
      },
      release);
}

}  // namespace fastconv

namespace {

PyObject* triton_launch_key_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "_triton_launch_key(args, kwargs, bindings, index) takes 4 arguments");
    return nullptr;
  }
  return fastconv::triton_launch_key(args[0], args[1], args[2], args[3]);
}

PyObject* triton_replay_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "_triton_replay(entry, inputs) takes 2 arguments");
    return nullptr;
  }
  return fastconv::triton_replay(args[0], args[1]);
}

PyObject* triton_replay_setup_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  return fastconv::triton_replay_setup(args, nargs);
}

PyObject* triton_conv2d_train_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  return fastconv::triton_conv2d_train(args, nargs);
}

PyObject* triton_conv_bn_act_train_py(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  return fastconv::triton_conv_bn_act_train(args, nargs);
}

// METH_FASTCALL: called per Triton launch, so without pybind11's argument dispatch
PyMethodDef raw_methods[] = {
    {"_triton_key_constant_types", [](PyObject*, PyObject* types) { return fastconv::set_constant_types(types); },
     METH_O, "the types whose objects _triton_launch_key keys by identity: see csrc/triton_launch.h"},
    {"_triton_launch_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_launch_key_py)),
     METH_FASTCALL, "(key, bound arguments) of a Triton launch: see csrc/triton_launch.h"},
    {"_triton_replay", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_replay_py)), METH_FASTCALL,
     "a layer call's Triton launches, replayed: see csrc/triton_launch.h"},
    {"_triton_conv2d_train", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_conv2d_train_py)),
     METH_FASTCALL, "a Triton conv's training call as one C++ autograd node: see csrc/triton_conv2d.h"},
    {"_triton_conv_bn_act_train",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_conv_bn_act_train_py)), METH_FASTCALL,
     "a Triton fused block's training call as one C++ autograd node: see csrc/triton_conv_bn_act.h"},
    {"_triton_replay_setup", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(triton_replay_setup_py)),
     METH_FASTCALL, "the state _triton_replay reads: see csrc/triton_launch.h"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastconv C++/CUDA ops: torch.ops.fastconv.ext_* and their direct entry points";
  fastconv::bind_ops(m);
  if (PyModule_AddFunctions(m.ptr(), raw_methods) != 0) throw pybind11::error_already_set();
}
