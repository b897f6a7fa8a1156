// The eager C++ autograd node of a Triton conv without an epilogue (fastconv._C._triton_conv2d_train): forward, dgrad
// and wgrad are replayed launches (csrc/triton_launch.h, fastconv/triton/replay.py), so a training step of such a
// conv has no Python frame once its call signature is learned. The Python autograd Function of fastconv.ops.conv2d
// runs the same launches; this node mirrors its Triton backward (fastconv.ops.conv2d.conv2d_grads): the output
// gradient cast to x's dtype, copied channels_last once when both dgrad and wgrad read an NCHW one, dx laid out
// like it, dw like the weight. The replays themselves are the Python trainer's (fastconv.ops.conv2d.TritonTrain):
// `fwd`, `dgrad`, `wgrad` / `wgrad_bias` Replay objects, each called with its inputs; a Replay runs its C++ entry
// or, for a call it has not learned, the Python launcher (learning it).
#include "triton_conv2d.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/custom_class.h>

#include "triton_launch.h"

namespace fastconv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A strong reference to a Python object that an autograd node keeps (its trainer), released with the GIL.
struct PyRef : torch::CustomClassHolder {
  explicit PyRef(PyObject* o) : obj(o) { Py_INCREF(o); }
  ~PyRef() override {
    if (Py_IsInitialized()) {
      PyGILState_STATE gil = PyGILState_Ensure();
      Py_DECREF(obj);
      PyGILState_Release(gil);
    }
  }
  PyObject* obj;
};

// The Python error as a C++ exception, kept so that it can cross the autograd engine's threads (as torch's own
// PyNode does); restored as itself when it reaches Python again.
[[noreturn]] void raise_python_error() {
  python_error err;
  err.persist();
  throw err;
}

// trainer.<name>(*tensors): the replay's outputs (a tuple of tensors), with the GIL held.
std::vector<at::Tensor> replay_call(PyObject* trainer, const char* name, std::initializer_list<at::Tensor> tensors) {
  PyObject* args = PyTuple_New(static_cast<Py_ssize_t>(tensors.size()));
  if (args == nullptr) raise_python_error();
  Py_ssize_t i = 0;
  for (const auto& t : tensors) PyTuple_SET_ITEM(args, i++, THPVariable_Wrap(t));
  PyObject* replay = PyObject_GetAttrString(trainer, name);
  PyObject* out = replay ? PyObject_Call(replay, args, nullptr) : nullptr;
  Py_XDECREF(replay);
  Py_DECREF(args);
  if (out == nullptr) raise_python_error();
  std::vector<at::Tensor> result;
  const bool ok = PyTuple_Check(out);
  for (Py_ssize_t j = 0; ok && j < PyTuple_GET_SIZE(out); ++j) {
    PyObject* t = PyTuple_GET_ITEM(out, j);
    if (!THPVariable_Check(t)) break;
    result.push_back(THPVariable_Unpack(t));
  }
  const bool complete = ok && static_cast<Py_ssize_t>(result.size()) == PyTuple_GET_SIZE(out);
  Py_DECREF(out);
  TORCH_CHECK(complete, "fastconv: trainer.", name, " must return a tuple of tensors");
  return result;
}

// fastconv._args.channels_strided: a 4-D tensor of more than one channel whose channels are not at stride 1.
bool channels_strided(const at::Tensor& t) { return t.dim() == 4 && t.size(1) > 1 && t.stride(1) != 1; }

struct TritonConv2dTrain : public torch::autograd::Function<TritonConv2dTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const c10::intrusive_ptr<PyRef>& trainer) {
    const bool has_bias = bias.has_value() && bias->defined();
    auto out = has_bias ? replay_call(trainer->obj, "fwd", {x, weight, *bias})
                        : replay_call(trainer->obj, "fwd", {x, weight});
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = has_bias;
    ctx->saved_data["trainer"] =
        c10::IValue::make_capsule(c10::static_intrusive_pointer_cast<torch::CustomClassHolder>(trainer));
    return {out.at(0)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);  // x, weight, bias, trainer
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    const bool want_b = ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2);
    auto trainer = c10::static_intrusive_pointer_cast<PyRef>(ctx->saved_data["trainer"].toCapsule());
    at::Tensor grad = grads[0].scalar_type() == x.scalar_type() ? grads[0] : grads[0].to(x.scalar_type());
    if (want_x && (want_w || want_b) && channels_strided(grad)) {  // read by both: one channels_last copy
      grad = grad.contiguous(at::MemoryFormat::ChannelsLast);
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    try {
      if (want_x) out[0] = replay_call(trainer->obj, "dgrad", {grad, weight}).at(0);
      if (want_w || want_b) {
        auto dw_db = replay_call(trainer->obj, want_b ? "wgrad_bias" : "wgrad", {grad, x, weight});
        if (want_w) out[1] = dw_db.at(0);
        if (want_b) out[2] = dw_db.at(1);
      }
    } catch (...) {
      PyGILState_Release(gil);
      throw;
    }
    PyGILState_Release(gil);
    return out;
  }
};

}  // namespace

PyObject* triton_conv2d_train(PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 4 || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) ||
      !(args[2] == Py_None || THPVariable_Check(args[2]))) {
    PyErr_SetString(PyExc_TypeError, "_triton_conv2d_train(x, weight, bias or None, trainer) takes 4 arguments");
    return nullptr;
  }
  c10::optional<at::Tensor> bias;
  if (args[2] != Py_None) bias = THPVariable_Unpack(args[2]);
  auto y = TritonConv2dTrain::apply(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]), bias,
                                    c10::make_intrusive<PyRef>(args[3]));
  return THPVariable_Wrap(y[0]);
  END_HANDLE_TH_ERRORS
}

}  // namespace fastconv
