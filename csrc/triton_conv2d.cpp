// The eager C++ autograd node of a Triton conv without an epilogue (fastconv._C._triton_conv2d_train): forward, dgrad
// and wgrad are replayed launches (csrc/triton_launch.h, fastconv/triton/replay.py), so a training step of such a
// conv has no Python frame once its call signature is learned. The Python autograd Function of fastconv.ops.conv2d
// runs the same launches; this node mirrors its Triton backward (fastconv.ops.conv2d.conv2d_grads): the output
// gradient cast to x's dtype, copied channels_last once when both dgrad and wgrad read an NCHW one, dx laid out
// like it, dw like the weight. The replays themselves are the Python trainer's (fastconv.ops.conv2d.TritonTrain):
// `fwd`, `dgrad`, `wgrad` / `wgrad_bias` Replay objects, each called with its inputs; a Replay runs its C++ entry
// or, for a call it has not learned, the Python launcher (learning it).
#include "triton_conv2d.h"

#include <torch/csrc/autograd/custom_function.h>

#include "triton_node.h"

namespace fastconv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using triton_node::channels_strided;
using triton_node::PyRef;

std::vector<at::Tensor> replay_call(PyObject* trainer, const char* name, std::initializer_list<at::Tensor> tensors) {
  return triton_node::call(trainer, name, std::vector<at::Tensor>(tensors));
}

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
    triton_node::Gil gil;
    if (want_x) out[0] = replay_call(trainer->obj, "dgrad", {grad, weight}).at(0);
    if (want_w || want_b) {
      auto dw_db = replay_call(trainer->obj, want_b ? "wgrad_bias" : "wgrad", {grad, x, weight});
      if (want_w) out[1] = dw_db.at(0);
      if (want_b) out[2] = dw_db.at(1);
    }
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
