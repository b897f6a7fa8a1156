// The eager C++ autograd node of the fused conv + BatchNorm + activation training block on the Triton backend
// (fastconv._C._triton_conv_bn_act_train): its forward (conv with the statistics partials, finalize with the
// running-statistics update, normalize) and its backward (BatchNorm's reduce and apply passes, x rebuilt from its
// producer, dgrad, wgrad) are one replay each (csrc/triton_launch.h, fastconv/triton/replay.py), so a training step
// of a block has no Python frame of fastconv's op layers once its call signature is learned. It mirrors the C++
// backends' node (csrc/conv_bn_act.cpp): the same autograd edges, saved tensors (x, or its producer's tensors
// instead), non-differentiable z / mean / var and version bumps of the running statistics; the launches are those
// of the Python autograd Function of fastconv.ops.conv_bn_act (its Triton branch and _backward), made by the
// trainer (fastconv.ops.conv_bn_act.TritonBlockTrain).
#include "triton_conv_bn_act.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/variable.h>

#include "conv_bn_act.h"
#include "triton_node.h"

namespace fastconv {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using triton_node::PyRef;
using OptTensor = c10::optional<at::Tensor>;

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// What the node needs besides its differentiable inputs (kept out of autograd's edges).
struct Extra {
  OptTensor running_mean, running_var, momentum_tensor, num_batches_tracked;
  bool keep_residual;
  std::vector<OptTensor> producer;  // z, mean, var, bn_weight, bn_bias, residual; empty: none
  double producer_eps;
  std::string producer_activation;
  c10::intrusive_ptr<PyRef> trainer;
};

using block_node::kBias;
using block_node::kBnBias;
using block_node::kBnWeight;
using block_node::kResidual;

struct TritonConvBnActTrain : public torch::autograd::Function<TritonConvBnActTrain> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                               const OptTensor& residual, const Extra& e) {
    std::vector<at::Tensor> inputs = {x, weight};
    for (const auto* t : {&bias, &bn_weight, &bn_bias, &residual, &e.running_mean, &e.running_var,
                          &e.momentum_tensor, &e.num_batches_tracked}) {
      if (given(*t)) inputs.push_back(**t);
    }
    auto out = triton_node::call(e.trainer->obj, "fwd", inputs);
    TORCH_CHECK(out.size() == 4, "fastconv: trainer.fwd must return (y, z, mean, var)");
    // the running statistics were updated in place: their version counters move as the custom op's would
    for (const auto* t : {&e.running_mean, &e.running_var, &e.num_batches_tracked}) {
      if (given(*t)) torch::autograd::impl::bump_version(**t);
    }
    const at::Tensor &y = out[0], &z = out[1], &mean = out[2], &var = out[3];

    ctx->mark_non_differentiable({z, mean, var});
    ctx->set_materialize_grads(false);  // z, mean, var get no gradient: no zero-filled tensors for them
    ctx->save_for_backward(block_node::saved(x, weight, bn_weight, bn_bias,
                                             e.keep_residual ? residual : c10::nullopt, z, mean, var, e.producer));
    ctx->saved_data["edges"] = block_node::edges(given(bias), given(bn_weight), given(bn_bias), given(residual));
    ctx->saved_data["producer"] = !e.producer.empty();
    ctx->saved_data["producer_eps"] = e.producer_eps;
    ctx->saved_data["producer_activation"] = e.producer_activation;
    ctx->saved_data["trainer"] =
        c10::IValue::make_capsule(c10::static_intrusive_pointer_cast<torch::CustomClassHolder>(e.trainer));
    return {y, z, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);  // x, weight, bias, bn_weight, bn_bias, residual, Extra
    const auto& grad = grads[0];
    if (!grad.defined()) return out;  // y took no part in the loss
    const auto saved = ctx->get_saved_variables();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const bool producer = ctx->saved_data["producer"].toBool();
    auto needs = [&](int64_t edge) { return edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(edge)); };
    const bool wants[] = {needs(0), needs(1), needs(edges[kBias]), needs(edges[kBnWeight]), needs(edges[kBnBias]),
                          needs(edges[kResidual])};
    // grad, z, mean, var, the given of (bn_weight, bn_bias, kept residual), weight, x or the producer's tensors
    std::vector<at::Tensor> inputs = {grad, saved[5], saved[6], saved[7]};
    for (size_t i : {2, 3, 4}) {
      if (saved[i].defined()) inputs.push_back(saved[i]);
    }
    inputs.push_back(saved[1]);
    if (producer) {
      for (size_t i = 8; i < saved.size(); ++i) {
        if (saved[i].defined()) inputs.push_back(saved[i]);
      }
    } else {
      inputs.push_back(saved[0]);
    }
    const bool flags[] = {wants[0], wants[1], wants[2], wants[3], wants[4], wants[5],
                          saved[2].defined(), saved[3].defined(), saved[4].defined(), producer,
                          producer && saved[11].defined(), producer && saved[12].defined(),
                          producer && saved[13].defined()};
    auto trainer = c10::static_intrusive_pointer_cast<PyRef>(ctx->saved_data["trainer"].toCapsule());
    const double producer_eps = ctx->saved_data["producer_eps"].toDouble();
    const std::string producer_activation = ctx->saved_data["producer_activation"].toStringRef();

    triton_node::Gil gil;
    PyObject* flag_tuple = PyTuple_New(13);
    if (flag_tuple != nullptr) {
      for (Py_ssize_t i = 0; i < 13; ++i) {
        PyObject* b = flags[i] ? Py_True : Py_False;
        Py_INCREF(b);
        PyTuple_SET_ITEM(flag_tuple, i, b);
      }
    }
    auto grads_out = triton_node::call(trainer->obj, "bwd", inputs,
                                       {flag_tuple, PyFloat_FromDouble(producer_eps),
                                        PyUnicode_FromString(producer_activation.c_str())});
    size_t k = 0;
    for (size_t i = 0; i < 6; ++i) {
      if (!wants[i]) continue;
      TORCH_CHECK(k < grads_out.size(), "fastconv: trainer.bwd returned fewer gradients than wanted");
      out[i] = grads_out[k++];
    }
    return out;
  }
};

OptTensor tensor_or_none(PyObject* o) {
  if (o == Py_None) return c10::nullopt;
  return THPVariable_Unpack(o);
}

}  // namespace

PyObject* triton_conv_bn_act_train(PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  bool ok = nargs == 20 && THPVariable_Check(args[0]) && THPVariable_Check(args[1]) && PyBool_Check(args[10]) &&
            PyFloat_Check(args[17]) && PyUnicode_Check(args[18]);
  for (Py_ssize_t i : {2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16}) {
    ok = ok && (args[i] == Py_None || THPVariable_Check(args[i]));
  }
  if (!ok) {
    PyErr_SetString(PyExc_TypeError,
                    "_triton_conv_bn_act_train(x, weight, bias, bn_weight, bn_bias, residual, running_mean, "
                    "running_var, momentum_tensor, num_batches_tracked, keep_residual, producer_z, producer_mean, "
                    "producer_var, producer_bn_weight, producer_bn_bias, producer_residual, producer_eps, "
                    "producer_activation, trainer): see csrc/triton_conv_bn_act.h");
    return nullptr;
  }
  Extra e{tensor_or_none(args[6]), tensor_or_none(args[7]), tensor_or_none(args[8]), tensor_or_none(args[9]),
          args[10] == Py_True, {}, PyFloat_AsDouble(args[17]), PyUnicode_AsUTF8(args[18]),
          c10::make_intrusive<PyRef>(args[19])};
  if (args[11] != Py_None) {
    for (Py_ssize_t i = 11; i < 17; ++i) e.producer.push_back(tensor_or_none(args[i]));
  }
  auto out = TritonConvBnActTrain::apply(THPVariable_Unpack(args[0]), THPVariable_Unpack(args[1]),
                                         tensor_or_none(args[2]), tensor_or_none(args[3]), tensor_or_none(args[4]),
                                         tensor_or_none(args[5]), e);
  PyObject* result = PyTuple_New(4);
  if (result == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < 4; ++i) PyTuple_SET_ITEM(result, i, THPVariable_Wrap(out[static_cast<size_t>(i)]));
  return result;
  END_HANDLE_TH_ERRORS
}

}  // namespace fastconv
