// What decides which compiled kernel Triton launches for a call, computed in one C++ pass over the arguments
// (fastconv/triton/launch.py's direct launch).
#pragma once

#include <Python.h>

namespace fastconv {

// The whole key of one launch, bound as fastconv._C._triton_launch_key(args, kwargs, bindings, index): a kernel call
// `kernel[grid](*args, **kwargs)` on device `index`, with `bindings` the kernel's dict
// {(len(args), keyword names): (parameter names after the positional ones, {name: default} of those the call may
// leave out, keyword names that are options) or None}. Returns (key, every bound argument in parameter order),
// key = (index, keyword names, an entry per bound argument and then per option value). Two keys are equal exactly
// when at each position there is: a tensor of the same dtype and 16-byte alignment of its data pointer (what
// Triton specializes a pointer on), the same int (ints are specialized on their value: == 1, divisibility by 16,
// 32 or 64 bits), a float (never specialized), the same bool, None, the same str or other hashable constant
// (constexpr values), the same object of a type registered with set_constant_types (by identity); an object of
// any other kind is not keyable.
// False when `bindings` has no entry for this call shape yet; None when the call is not keyable (its binding is
// None, an argument is missing, or an argument is not keyable).
PyObject* triton_launch_key(PyObject* args, PyObject* kwargs, PyObject* bindings, PyObject* index);

// fastconv._C._triton_key_constant_types(types): the types (a tuple; subclasses included) whose objects
// triton_launch_key keys by identity, e.g. (triton.language.dtype,). Replaces the previous set.
PyObject* set_constant_types(PyObject* types);

// A call of one or more Triton launches, replayed (fastconv/triton/replay.py's Replay): what a launch's key checks,
// checked directly against the call it was learned from, the buffers allocated and the compiled kernels' launchers
// called in order, in one C++ call instead of the op layers' Python. Bound as
// fastconv._C._triton_replay(entry, inputs):
//   entry = (launches, in_specs, out_specs, device index, dry, stream, outputs), made by replay.replay_entry.
//   launches: per launch (run, function, metadata, (gx, gy, gz), full, slots); `run(gx, gy, gz, stream, function,
//   metadata, None, None, None, *full)` is the launch (JITFunction.run's convention, as the direct launch), slots
//   (position in full, source) fill full's tensors: source i < len(inputs) is input i (or its copy), else allocated
//   buffer i - len(inputs); full's other tensors (ticket counters) are passed as they are. in_specs, per input
//   tensor: (sizes, strides, dtype, the 16-byte alignment of what the kernels read, whether they read a
//   channels_last copy of it). out_specs, per buffer to allocate on the first input's device: (sizes, strides,
//   dtype): the call's outputs, then the scratch and intermediates the launches write before they read them. A
//   buffer one launch writes and a later one reads is the same allocation. device index: -1 for CPU tensors (tests,
//   the dry run). dry: made in a dry run (never launches, so it has no compiled kernel: run is None). stream: None,
//   or the raw stream the entry is bound to (its ticket counters belong to it). outputs: how many of the allocated
//   buffers are the call's outputs (read by the Python caller).
// Returns the tuple of allocated buffers, or None where the replay does not apply and the caller takes its Python
// path: an input that differs from its spec (dtype, sizes, strides, alignment, device) or is neither a plain tensor
// nor an nn.Parameter (a subclass's __torch_function__), a TorchFunctionMode in force, a device or (bound entries)
// stream that is not current, a recorder (the launch plan) or forced tile in force, a launch hook set,
// FASTCONV_DIRECT_LAUNCH off, a dry entry outside a dry run. Inside launch.dry_run() it does everything but call
// `run`.
PyObject* triton_replay(PyObject* entry, PyObject* inputs);

// fastconv._C._triton_replay_setup(recorder, discard_type, forced, runtime_knobs, current_device, current_stream,
// parameter_type, function_mode_enabled, poison): the state triton_replay reads (the launch module's ContextVars,
// its dry-run recorder type, Triton's knobs.runtime, torch's current CUDA device and raw stream getters,
// torch.nn.Parameter, torch._C._is_torch_function_mode_enabled) and whether it fills each output with NaN first
// (tests: an element the kernel fails to write shows).
PyObject* triton_replay_setup(PyObject* const* args, Py_ssize_t nargs);

}  // namespace fastconv
