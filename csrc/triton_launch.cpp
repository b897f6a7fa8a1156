// fastconv._C._triton_launch_key (csrc/triton_launch.h): the key fastconv/triton/launch.py keeps the compiled kernels
// of its direct launches under, and the bound arguments it calls them with. Triton's own launch path binds and
// specializes with one Python-level call per argument and hashes the result with the options' str() (5-13 us per
// launch of fastconv's 27-66 argument kernels, bench/_launch_binding.py); this is one pass in C++.
#include "triton_launch.h"

#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <unordered_map>

namespace fastconv {
namespace {

// Distinct objects standing for a tensor's (dtype, aligned), any float and each bool in a key: they compare equal
// only to themselves, so a tensor never matches an int, 1.0 never matches 1, True never matches 1. Created on
// first use and kept for the process (the GIL is held whenever these run).
constexpr int kMaxDtypes = 64;
constexpr int kFloat = 2 * kMaxDtypes, kFalse = kFloat + 1, kTrue = kFloat + 2;
std::array<PyObject*, kTrue + 1> sentinels{};

PyObject* new_sentinel() { return PyObject_CallNoArgs(reinterpret_cast<PyObject*>(&PyBaseObject_Type)); }

// A new reference to sentinel `index`; nullptr with a Python error set if it cannot be created.
PyObject* sentinel(int index) {
  if (sentinels[index] == nullptr) sentinels[index] = new_sentinel();
  Py_XINCREF(sentinels[index]);
  return sentinels[index];
}

// The key entry of a tensor (a new reference), nullptr with no Python error set: not keyable.
PyObject* tensor_entry(PyObject* arg) {
  const at::Tensor& t = THPVariable_Unpack(arg);
  if (!t.defined() || !t.has_storage()) return nullptr;
  const int dtype = static_cast<int>(t.scalar_type());
  if (dtype < 0 || dtype >= kMaxDtypes) return nullptr;
  const bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  return sentinel(2 * dtype + (aligned ? 1 : 0));
}

// Other constants, of the types registered with set_constant_types (triton dtypes: few, long-lived objects), stand in
// a key by identity: each distinct object gets its own sentinel, the object kept alive with it so that its address
// is never reused. An equal but distinct object is a different key (a finer key: one more first launch through
// Triton, never a wrong kernel), and no Python-level __hash__ runs per launch. The table stops growing at
// kMaxConstants (further objects: not keyable). Objects of any other type are not keyable.
constexpr size_t kMaxConstants = 4096;
std::unordered_map<PyObject*, PyObject*> constants;  // object (strong ref) -> its sentinel (strong ref)
PyObject* constant_types = nullptr;                  // a tuple of types (strong ref)

PyObject* constant_entry(PyObject* arg) {
  auto found = constants.find(arg);
  if (found != constants.end()) {
    Py_INCREF(found->second);
    return found->second;
  }
  if (constant_types == nullptr || constants.size() >= kMaxConstants) return nullptr;
  bool registered = false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(constant_types) && !registered; ++i) {
    registered = PyType_IsSubtype(Py_TYPE(arg), reinterpret_cast<PyTypeObject*>(PyTuple_GET_ITEM(constant_types, i)));
  }
  if (!registered) return nullptr;
  PyObject* s = new_sentinel();
  if (s == nullptr) return nullptr;
  Py_INCREF(arg);
  constants.emplace(arg, s);
  Py_INCREF(s);
  return s;
}

// The key entry of one argument (a new reference), nullptr: not keyable (a Python error set only on failure).
// Most arguments are ints, then exact tensors: those first; THPVariable_Check (an isinstance) only for the rest.
PyObject* entry(PyObject* arg) {
  if (PyLong_CheckExact(arg) || arg == Py_None || PyUnicode_CheckExact(arg)) {
    Py_INCREF(arg);
    return arg;
  }
  if (THPVariable_CheckExact(arg)) return tensor_entry(arg);
  if (PyBool_Check(arg) || PyFloat_CheckExact(arg)) {
    return sentinel(arg == Py_True ? kTrue : arg == Py_False ? kFalse : kFloat);
  }
  if (THPVariable_Check(arg)) return tensor_entry(arg);  // subclasses: nn.Parameter
  return constant_entry(arg);
}

// A new reference to kwargs[name], else defaults[name]; nullptr (no error set) when neither has it.
PyObject* argument(PyObject* kwargs, PyObject* defaults, PyObject* name) {
  PyObject* v = PyDict_GetItemWithError(kwargs, name);
  if (v == nullptr && !PyErr_Occurred()) v = PyDict_GetItemWithError(defaults, name);
  Py_XINCREF(v);
  return v;
}

}  // namespace

PyObject* set_constant_types(PyObject* types) {
  bool ok = PyTuple_Check(types);
  for (Py_ssize_t i = 0; ok && i < PyTuple_GET_SIZE(types); ++i) ok = PyType_Check(PyTuple_GET_ITEM(types, i));
  if (!ok) {
    PyErr_SetString(PyExc_TypeError, "_triton_key_constant_types takes a tuple of types");
    return nullptr;
  }
  Py_INCREF(types);
  Py_XSETREF(constant_types, types);
  Py_RETURN_NONE;
}

PyObject* triton_launch_key(PyObject* args, PyObject* kwargs, PyObject* bindings, PyObject* index) {
  if (!PyTuple_Check(args) || !PyDict_Check(kwargs) || !PyDict_Check(bindings)) Py_RETURN_NONE;
  const Py_ssize_t nargs = PyTuple_GET_SIZE(args);
  PyObject* kwnames = PySequence_Tuple(kwargs);  // the keyword names, in call order
  if (kwnames == nullptr) return nullptr;
  PyObject* nargs_obj = PyLong_FromSsize_t(nargs);
  PyObject* bkey = nargs_obj ? PyTuple_Pack(2, nargs_obj, kwnames) : nullptr;
  Py_XDECREF(nargs_obj);
  PyObject* binding = bkey ? PyDict_GetItemWithError(bindings, bkey) : nullptr;  // borrowed
  Py_XDECREF(bkey);
  if (binding == nullptr) {
    Py_DECREF(kwnames);
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_FALSE;  // not bound yet: the caller binds this call shape and asks again
  }
  if (!PyTuple_Check(binding) || PyTuple_GET_SIZE(binding) != 3) {  // None: Triton binds this call shape
    Py_DECREF(kwnames);
    Py_RETURN_NONE;
  }
  PyObject* tail = PyTuple_GET_ITEM(binding, 0);      // parameter names after the positional ones
  PyObject* defaults = PyTuple_GET_ITEM(binding, 1);  // their defaults, for names the call leaves out
  PyObject* options = PyTuple_GET_ITEM(binding, 2);   // keyword names that are not parameters
  const Py_ssize_t ntail = PyTuple_GET_SIZE(tail), nopt = PyTuple_GET_SIZE(options);
  PyObject* full = PyTuple_New(nargs + ntail);
  PyObject* key = PyTuple_New(2 + nargs + ntail + nopt);
  if (full == nullptr || key == nullptr) {
    Py_XDECREF(full);
    Py_XDECREF(key);
    Py_DECREF(kwnames);
    return nullptr;
  }
  Py_INCREF(index);
  PyTuple_SET_ITEM(key, 0, index);
  PyTuple_SET_ITEM(key, 1, kwnames);  // the key owns kwnames now
  for (Py_ssize_t i = 0; i < nargs + ntail + nopt; ++i) {
    PyObject* v;  // a new reference
    if (i < nargs) {
      v = PyTuple_GET_ITEM(args, i);
      Py_INCREF(v);
    } else if (i < nargs + ntail) {
      v = argument(kwargs, defaults, PyTuple_GET_ITEM(tail, i - nargs));
    } else {
      v = argument(kwargs, defaults, PyTuple_GET_ITEM(options, i - nargs - ntail));
    }
    PyObject* e = v ? entry(v) : nullptr;
    if (e == nullptr) {  // a missing or unkeyable argument (None back), or a Python error
      Py_XDECREF(v);
      Py_DECREF(full);
      Py_DECREF(key);
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    PyTuple_SET_ITEM(key, 2 + i, e);
    if (i < nargs + ntail) {
      PyTuple_SET_ITEM(full, i, v);  // steals v
    } else {
      Py_DECREF(v);
    }
  }
  PyObject* out = PyTuple_Pack(2, key, full);
  Py_DECREF(key);
  Py_DECREF(full);
  return out;
}

}  // namespace fastconv
