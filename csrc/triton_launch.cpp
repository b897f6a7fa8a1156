// fastconv._C._triton_launch_key (csrc/triton_launch.h): the key fastconv/triton/launch.py keeps the compiled kernels
// of its direct launches under, and the bound arguments it calls them with. Triton's own launch path binds and
// specializes with one Python-level call per argument and hashes the result with the options' str() (5-13 us per
// launch of fastconv's 27-66 argument kernels, bench/_launch_binding.py); this is one pass in C++.
#include "triton_launch.h"

#include <ATen/ops/empty_strided.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <vector>

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

// ---------------------------------------------------------------------------------------------------------------
// triton_replay

namespace {

struct ReplayState {
  PyObject* recorder = nullptr;        // launch._recorder (ContextVar)
  PyObject* discard = nullptr;         // launch._Discard (the dry run's recorder type)
  PyObject* forced = nullptr;          // launch._forced (ContextVar)
  PyObject* knobs = nullptr;           // triton.knobs.runtime
  PyObject* current_device = nullptr;  // torch.cuda.current_device
  PyObject* current_stream = nullptr;  // torch._C._cuda_getCurrentRawStream
  PyObject* parameter = nullptr;       // torch.nn.Parameter
  PyObject* function_mode = nullptr;   // torch._C._is_torch_function_mode_enabled
  bool poison = false;
} replay_state;

// fastconv/triton/launch.py's _hooks_set without the kernel's pre-run hooks (checked when the entry is made): 1 when
// a launch enter / exit hook would run, 0 when none, -1 on a Python error.
int launch_hooks_set() {
  for (const char* name : {"launch_enter_hook", "launch_exit_hook"}) {
    PyObject* hook = PyObject_GetAttrString(replay_state.knobs, name);
    if (hook == nullptr) return -1;
    int set = 0;
    if (hook != Py_None) {
      PyObject* calls = PyObject_GetAttrString(hook, "calls");
      if (calls == nullptr) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
          Py_DECREF(hook);
          return -1;
        }
        PyErr_Clear();
        set = 1;  // a hook of another kind: set
      } else {
        set = PyObject_IsTrue(calls);
        Py_DECREF(calls);
      }
    }
    Py_DECREF(hook);
    if (set != 0) return set;
  }
  return 0;
}

// _backend.env_flag("FASTCONV_DIRECT_LAUNCH", True): os.environ's assignments reach the C environment (putenv).
bool direct_launch_enabled() {
  const char* v = std::getenv("FASTCONV_DIRECT_LAUNCH");
  return v == nullptr || !(v[0] == '\0' || std::strcmp(v, "0") == 0);
}

// Whether `dims` (a tuple of ints) equals `values`.
bool same_dims(PyObject* dims, c10::IntArrayRef values) {
  if (!PyTuple_Check(dims) || PyTuple_GET_SIZE(dims) != static_cast<Py_ssize_t>(values.size())) return false;
  for (size_t i = 0; i < values.size(); ++i) {
    const long long v = PyLong_AsLongLong(PyTuple_GET_ITEM(dims, static_cast<Py_ssize_t>(i)));
    if (v == -1 && PyErr_Occurred()) return false;
    if (v != values[i]) return false;
  }
  return true;
}

std::vector<int64_t> dims_of(PyObject* dims) {
  std::vector<int64_t> out(static_cast<size_t>(PyTuple_GET_SIZE(dims)));
  for (size_t i = 0; i < out.size(); ++i) out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(dims, static_cast<Py_ssize_t>(i)));
  return out;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0; }

// 1: the replay may run now (*dry: inside a dry run), 0: not now, -1: a Python error.
int replay_mode(bool entry_dry, bool* dry) {
  PyObject* rec = nullptr;
  if (PyContextVar_Get(replay_state.recorder, Py_None, &rec) < 0) return -1;
  const bool none = rec == Py_None;
  const bool discard = !none && PyObject_TypeCheck(rec, reinterpret_cast<PyTypeObject*>(replay_state.discard));
  Py_DECREF(rec);
  if (!none && !discard) return 0;  // the launch plan records: its own path
  *dry = discard;
  if (entry_dry && !discard) return 0;  // a dry entry has no kernel to launch
  PyObject* forced = nullptr;
  if (PyContextVar_Get(replay_state.forced, Py_None, &forced) < 0) return -1;
  const bool is_forced = forced != Py_None;
  Py_DECREF(forced);
  if (is_forced) return 0;
  PyObject* mode = PyObject_CallNoArgs(replay_state.function_mode);  // a TorchFunctionMode sees the Python path
  if (mode == nullptr) return -1;
  const int in_mode = PyObject_IsTrue(mode);
  Py_DECREF(mode);
  if (in_mode != 0) return in_mode < 0 ? -1 : 0;
  const int hooks = launch_hooks_set();
  if (hooks != 0) return hooks < 0 ? -1 : 0;
  return direct_launch_enabled() ? 1 : 0;
}

// A new reference to tensor `t` as a Python object: `original` itself when it is that tensor.
PyObject* wrap(const at::Tensor& t, PyObject* original, const at::Tensor& original_tensor) {
  if (t.unsafeGetTensorImpl() == original_tensor.unsafeGetTensorImpl()) {
    Py_INCREF(original);
    return original;
  }
  return THPVariable_Wrap(t);
}

// A new reference, released when it goes out of scope unless release()d (every early return and exception).
struct Ref {
  PyObject* p;
  explicit Ref(PyObject* o = nullptr) : p(o) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p); }
  PyObject* release() {
    PyObject* o = p;
    p = nullptr;
    return o;
  }
};

// run(gx, gy, gz, stream, function, metadata, None, None, None, *template) of one launch of an entry, its slots
// filled from `sources` (borrowed: the inputs as the kernels read them, then the allocated buffers); nullptr with a
// Python error set on failure, else a new reference to None (or to what run returned).
PyObject* launch_one(PyObject* launch, PyObject* stream, const std::vector<PyObject*>& sources, bool dry) {
  if (!PyTuple_Check(launch) || PyTuple_GET_SIZE(launch) != 6) {
    PyErr_SetString(PyExc_ValueError, "_triton_replay: a launch is (run, function, metadata, grid, template, slots)");
    return nullptr;
  }
  PyObject* grid = PyTuple_GET_ITEM(launch, 3);
  PyObject* full = PyTuple_GET_ITEM(launch, 4);
  PyObject* slots = PyTuple_GET_ITEM(launch, 5);
  const Py_ssize_t n_full = PyTuple_GET_SIZE(full);
  const Py_ssize_t n_src = static_cast<Py_ssize_t>(sources.size());
  std::vector<PyObject*> filled(static_cast<size_t>(n_full), nullptr);  // borrowed
  for (Py_ssize_t s = 0; s < PyTuple_GET_SIZE(slots); ++s) {
    PyObject* slot = PyTuple_GET_ITEM(slots, s);
    const Py_ssize_t pos = PyLong_AsSsize_t(PyTuple_GET_ITEM(slot, 0));
    const Py_ssize_t src = PyLong_AsSsize_t(PyTuple_GET_ITEM(slot, 1));
    if (pos < 0 || pos >= n_full || src < 0 || src >= n_src) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_triton_replay: a slot out of range");
      return nullptr;
    }
    filled[static_cast<size_t>(pos)] = sources[static_cast<size_t>(src)];
  }
  if (dry) Py_RETURN_NONE;
  Ref args(PyTuple_New(9 + n_full));
  if (args.p == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < 3; ++i) {
    PyObject* g = PyTuple_GET_ITEM(grid, i);
    Py_INCREF(g);
    PyTuple_SET_ITEM(args.p, i, g);
  }
  Py_INCREF(stream);
  PyTuple_SET_ITEM(args.p, 3, stream);
  for (Py_ssize_t i = 1; i < 3; ++i) {  // function, metadata
    PyObject* v = PyTuple_GET_ITEM(launch, i);
    Py_INCREF(v);
    PyTuple_SET_ITEM(args.p, 3 + i, v);
  }
  for (Py_ssize_t i = 6; i < 9; ++i) {  // launch metadata, enter hook, exit hook
    Py_INCREF(Py_None);
    PyTuple_SET_ITEM(args.p, i, Py_None);
  }
  for (Py_ssize_t i = 0; i < n_full; ++i) {
    PyObject* v = filled[static_cast<size_t>(i)];
    if (v == nullptr) v = PyTuple_GET_ITEM(full, i);
    Py_INCREF(v);
    PyTuple_SET_ITEM(args.p, 9 + i, v);
  }
  return PyObject_Call(PyTuple_GET_ITEM(launch, 0), args.p, nullptr);
}

PyObject* replay(PyObject* entry, PyObject* inputs) {
  if (replay_state.recorder == nullptr || !PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 7 ||
      !PyTuple_Check(inputs) || !PyTuple_Check(PyTuple_GET_ITEM(entry, 0))) {
    Py_RETURN_NONE;
  }
  PyObject* launches = PyTuple_GET_ITEM(entry, 0);
  PyObject* in_specs = PyTuple_GET_ITEM(entry, 1);
  PyObject* out_specs = PyTuple_GET_ITEM(entry, 2);
  const long device = PyLong_AsLong(PyTuple_GET_ITEM(entry, 3));
  if (device == -1 && PyErr_Occurred()) return nullptr;
  bool dry = false;
  const int mode = replay_mode(PyTuple_GET_ITEM(entry, 4) == Py_True, &dry);
  if (mode <= 0) {
    if (mode < 0) return nullptr;
    Py_RETURN_NONE;
  }
  const Py_ssize_t n_in = PyTuple_GET_SIZE(inputs);
  if (n_in == 0 || n_in != PyTuple_GET_SIZE(in_specs)) Py_RETURN_NONE;

  // every check before any work: the inputs against their specs, then the current device and stream
  for (Py_ssize_t i = 0; i < n_in; ++i) {
    PyObject* obj = PyTuple_GET_ITEM(inputs, i);
    PyObject* spec = PyTuple_GET_ITEM(in_specs, i);
    // a tensor or nn.Parameter: a subclass's __torch_function__ would see the Python path's torch calls
    if (!THPVariable_CheckExact(obj) && Py_TYPE(obj) != reinterpret_cast<PyTypeObject*>(replay_state.parameter)) {
      Py_RETURN_NONE;
    }
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined() || !t.has_storage() ||
        t.scalar_type() != reinterpret_cast<THPDtype*>(PyTuple_GET_ITEM(spec, 2))->scalar_type) {
      Py_RETURN_NONE;
    }
    if (device < 0 ? !t.is_cpu() : (!t.is_cuda() || t.device().index() != device)) Py_RETURN_NONE;
    if (!same_dims(PyTuple_GET_ITEM(spec, 0), t.sizes()) || !same_dims(PyTuple_GET_ITEM(spec, 1), t.strides())) {
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    // what the kernel reads as it is must be aligned as it was (a channels_last copy is checked once it is made)
    if (PyTuple_GET_ITEM(spec, 4) != Py_True && aligned16(t) != (PyTuple_GET_ITEM(spec, 3) == Py_True)) {
      Py_RETURN_NONE;
    }
  }
  Ref stream;
  if (device >= 0 && !dry) {  // Triton launches on the current device: a call on another takes the guarded path
    Ref current(PyObject_CallNoArgs(replay_state.current_device));
    if (current.p == nullptr) return nullptr;
    const long index = PyLong_AsLong(current.p);
    if (index == -1 && PyErr_Occurred()) return nullptr;
    if (index != device) Py_RETURN_NONE;
    Ref index_obj(PyLong_FromLong(device));
    if (index_obj.p == nullptr) return nullptr;
    stream.p = PyObject_CallOneArg(replay_state.current_stream, index_obj.p);
    if (stream.p == nullptr) return nullptr;
    PyObject* bound = PyTuple_GET_ITEM(entry, 5);  // the entry keeps a stream's ticket counters: that stream only
    if (bound != Py_None) {
      const int same = PyObject_RichCompareBool(stream.p, bound, Py_EQ);
      if (same < 0) return nullptr;
      if (same == 0) Py_RETURN_NONE;
    }
  } else {
    stream.p = PyLong_FromLong(0);
    if (stream.p == nullptr) return nullptr;
  }

  // the inputs as the kernels read them (the tensor or its channels_last copy), then the buffers they write
  const Py_ssize_t n_out = PyTuple_GET_SIZE(out_specs);
  std::vector<PyObject*> sources(static_cast<size_t>(n_in + n_out), nullptr);  // borrowed from `seen` / outputs
  Ref seen(PyTuple_New(n_in));
  Ref outputs(PyTuple_New(n_out));
  if (seen.p == nullptr || outputs.p == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n_in; ++i) {
    PyObject* obj = PyTuple_GET_ITEM(inputs, i);
    const at::Tensor& t = THPVariable_Unpack(obj);
    PyObject* spec = PyTuple_GET_ITEM(in_specs, i);
    PyObject* k = obj;
    if (PyTuple_GET_ITEM(spec, 4) == Py_True) {
      at::Tensor copy = t.contiguous(at::MemoryFormat::ChannelsLast);
      if (aligned16(copy) != (PyTuple_GET_ITEM(spec, 3) == Py_True)) Py_RETURN_NONE;
      k = wrap(copy, obj, t);
      if (k == nullptr) return nullptr;
    } else {
      Py_INCREF(k);
    }
    PyTuple_SET_ITEM(seen.p, i, k);
    sources[static_cast<size_t>(i)] = k;
  }
  const at::Tensor& first = THPVariable_Unpack(PyTuple_GET_ITEM(inputs, 0));
  for (Py_ssize_t j = 0; j < n_out; ++j) {
    PyObject* spec = PyTuple_GET_ITEM(out_specs, j);
    at::Tensor y = at::empty_strided(dims_of(PyTuple_GET_ITEM(spec, 0)), dims_of(PyTuple_GET_ITEM(spec, 1)),
                                     first.options().dtype(
                                         reinterpret_cast<THPDtype*>(PyTuple_GET_ITEM(spec, 2))->scalar_type));
    if (replay_state.poison && at::isFloatingType(y.scalar_type())) y.fill_(std::numeric_limits<double>::quiet_NaN());
    PyObject* wrapped = THPVariable_Wrap(y);
    if (wrapped == nullptr) return nullptr;
    PyTuple_SET_ITEM(outputs.p, j, wrapped);
    sources[static_cast<size_t>(n_in + j)] = wrapped;
  }

  // the launches, in the order the call made them, on the current stream
  for (Py_ssize_t l = 0; l < PyTuple_GET_SIZE(launches); ++l) {
    Ref done(launch_one(PyTuple_GET_ITEM(launches, l), stream.p, sources, dry));
    if (done.p == nullptr) return nullptr;
  }
  return outputs.release();
}

}  // namespace

PyObject* triton_replay(PyObject* entry, PyObject* inputs) {
  HANDLE_TH_ERRORS
  return replay(entry, inputs);
  END_HANDLE_TH_ERRORS
}

PyObject* triton_replay_setup(PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9 || !PyType_Check(args[1]) || !PyType_Check(args[6])) {
    PyErr_SetString(PyExc_TypeError,
                    "_triton_replay_setup(recorder, discard_type, forced, runtime_knobs, current_device, "
                    "current_stream, parameter_type, function_mode_enabled, poison) takes 9 arguments");
    return nullptr;
  }
  PyObject** fields[] = {&replay_state.recorder,       &replay_state.discard,        &replay_state.forced,
                         &replay_state.knobs,          &replay_state.current_device, &replay_state.current_stream,
                         &replay_state.parameter,      &replay_state.function_mode};
  for (int i = 0; i < 8; ++i) {
    Py_INCREF(args[i]);
    Py_XSETREF(*fields[i], args[i]);
  }
  replay_state.poison = PyObject_IsTrue(args[8]) == 1;
  Py_RETURN_NONE;
}

}  // namespace fastconv
