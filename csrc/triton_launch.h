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

}  // namespace fastconv
