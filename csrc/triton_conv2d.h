// A Triton conv without an epilogue as one eager C++ autograd node whose launches are replays (csrc/triton_conv2d.cpp).
#pragma once

#include <Python.h>

namespace fastconv {

// fastconv._C._triton_conv2d_train(x, weight, bias or None, trainer) -> y, with y's autograd node in C++: forward
// trainer.fwd(x, weight[, bias]); backward trainer.dgrad(grad, weight) and trainer.wgrad(grad, x, weight) (or
// trainer.wgrad_bias: (dw, db)), each a fastconv/triton/replay.py Replay returning a tuple of tensors.
PyObject* triton_conv2d_train(PyObject* const* args, Py_ssize_t nargs);

}  // namespace fastconv
