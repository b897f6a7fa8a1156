// What the eager C++ autograd nodes of Triton calls share (csrc/triton_conv2d.cpp, csrc/triton_conv_bn_act.cpp):
// the Python trainer they keep, Python errors carried across the autograd engine, and calls of the trainer's
// replays (fastconv/triton/replay.py), each returning a tuple of tensors.
#pragma once

#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/custom_class.h>

#include <vector>

namespace fastconv {
namespace triton_node {

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
[[noreturn]] inline void raise_python_error() {
  python_error err;
  err.persist();
  throw err;
}

// trainer.<name>(*head, *tensors): the replay's outputs (a tuple of tensors), with the GIL held. `head`: leading
// Python arguments (new references, stolen).
inline std::vector<at::Tensor> call(PyObject* trainer, const char* name, const std::vector<at::Tensor>& tensors,
                                    std::vector<PyObject*> head = {}) {
  for (PyObject* h : head) {
    if (h == nullptr) {
      for (PyObject* o : head) Py_XDECREF(o);
      raise_python_error();
    }
  }
  PyObject* args = PyTuple_New(static_cast<Py_ssize_t>(head.size() + tensors.size()));
  if (args == nullptr) {
    for (PyObject* o : head) Py_DECREF(o);
    raise_python_error();
  }
  Py_ssize_t i = 0;
  for (PyObject* h : head) PyTuple_SET_ITEM(args, i++, h);
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

// Holds the GIL for a backward's trainer calls (the autograd engine's thread does not), released on every exit.
struct Gil {
  PyGILState_STATE state;
  Gil() : state(PyGILState_Ensure()) {}
  ~Gil() { PyGILState_Release(state); }
  Gil(const Gil&) = delete;
  Gil& operator=(const Gil&) = delete;
};

// fastconv._args.channels_strided: a 4-D tensor of more than one channel whose channels are not at stride 1.
inline bool channels_strided(const at::Tensor& t) { return t.dim() == 4 && t.size(1) > 1 && t.stride(1) != 1; }

}  // namespace triton_node
}  // namespace fastconv
