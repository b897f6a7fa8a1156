// The fused conv + BatchNorm + activation training block on the Triton backend as one eager C++ autograd node whose
// launches are replays (csrc/triton_conv_bn_act.cpp).
#pragma once

#include <Python.h>

namespace fastconv {

// fastconv._C._triton_conv_bn_act_train(x, weight, bias, bn_weight, bn_bias, residual, running_mean, running_var,
// momentum_tensor, num_batches_tracked, keep_residual, producer_z, producer_mean, producer_var, producer_bn_weight,
// producer_bn_bias, producer_residual, producer_eps, producer_activation, trainer) -> (y, z, mean, var): tensors or
// None (num_batches_tracked: the one this call counts, ops.conv_bn_act.counted_here); keep_residual: whether the
// backward reads the residual again (a non-identity activation); producer_*: the block that made x (its tensors
// all None: none). Forward: trainer.fwd(x, weight, *the given ones of bias .. num_batches_tracked), the running
// statistics' version counters bumped after it; backward: trainer.bwd(flags, producer_eps, producer_activation,
// grad, z, mean, var, *the given ones of bn_weight, bn_bias and the kept residual, weight, x or the given producer
// tensors) with flags = (want dx, dw, db, dbn_weight, dbn_bias, dresidual, bn_weight given, bn_bias given, residual
// kept, producer, producer bn_weight given, producer bn_bias given, producer residual given), returning the wanted
// gradients in that order (fastconv.ops.conv_bn_act.TritonBlockTrain).
PyObject* triton_conv_bn_act_train(PyObject* const* args, Py_ssize_t nargs);

}  // namespace fastconv
