"""A call of Triton launches, replayed in one C++ call.

Through the op layers a Triton launch costs 8-21 µs of Python host time per call on an AMD EPYC core
(bench/_overhead.py), against 3-8 µs for a whole nn module call. A `Replay` runs a call once through the op's
Python path (`compute`), watching the launches it makes (launch._capture) and the scratch and ticket counters it
gets (_common.allocations), and keeps what those launches need besides the call's tensors: each compiled kernel's
launcher, grid and every bound argument, the positions of the call's tensors in them, and their specs. Later calls
go to `fastconv._C._triton_replay` (csrc/triton_launch.cpp), which checks the call's tensors against those specs
(dtype, sizes, strides, 16-byte alignment, device: what the direct launch's key checks, so the same compiled
kernels are valid), makes the channels_last copies the launches read, allocates the outputs, scratch and
intermediates (a buffer one launch writes and the next reads) and calls the launchers in order: ~1 µs per launch.
Users: the functional layer's no-grad conv (any epilogue: eval blocks) and max-pool calls, the Conv2d training
node (ops.conv2d.TritonTrain, csrc/triton_conv2d.cpp) and the fused block's training node (ops.conv_bn_act
.TritonBlockTrain, csrc/triton_conv_bn_act.cpp: its forward and backward are a replay each, 3-6 launches).

The compute's contract: its outputs and the buffers it gets from `workspace` are allocated empty and written only
by its launches, and whatever else a launch reads is an input (or its channels_last copy, returned as `seen`) or
a ticket counter. It falls back to the Python path (and learns the call again; after calls it could not learn,
only every 2nd, 4th, ... 1024th call tries) wherever the replay does not hold: a tensor that differs from its
spec, a device (or, for an entry holding ticket counters, a stream) that is not the current one, the launch plan
recording, a forced tile, a launch hook (proton), FASTCONV_DIRECT_LAUNCH=0, a kernel with pre-run hooks, a
TorchFunctionMode, a tensor subclass, a call that launched nothing (an empty output) or autotuned, a launch that
read a tensor the next call would not supply (one a PyTorch op computed), an output no launch wrote, an output or
scratch buffer a PyTorch op also wrote, an input a PyTorch op wrote in place (e.g. running statistics updated by
PyTorch ops), no compiled kernel (the interpreter), no extension. Whatever else a launch depends on must be in
the caller's key: the caller keeps one Replay per call signature (functional.py's per-signature caches, whose keys
hold the backend, the shapes, dtypes and devices, the arguments and the TF32 setting). Inside launch.dry_run() a
replay does all of this but call the launchers (its entries are dry: they have no kernel, and the dry run's
callers key their caches apart from real calls).
"""
from __future__ import annotations

import torch
import triton

from . import _common, launch as _launch

_replay = None  # fastconv._C._triton_replay once set up; False: unavailable
_POISON = False  # tests: the C++ replay fills its outputs with NaN first


def _replay_fn():
    global _replay
    if _replay is None:
        from .. import _ext

        _replay = False
        if _ext.load() and _launch._launch_key_fn():
            import fastconv._C as ext

            if hasattr(ext, "_triton_replay"):
                _setup(ext)
                _replay = ext._triton_replay
    return _replay


def _setup(ext) -> None:
    cuda = hasattr(torch._C, "_cuda_getCurrentRawStream")  # (a CPU-only torch has none: no CUDA tensor either)
    ext._triton_replay_setup(_launch._recorder, _launch._Discard, _launch._forced, triton.knobs.runtime,
                             torch._C._cuda_getDevice if cuda else torch.cuda.current_device,
                             torch._C._cuda_getCurrentRawStream if cuda else _no_stream, torch.nn.Parameter,
                             torch._C._is_torch_function_mode_enabled, _POISON)


def _no_stream(index: int) -> int:
    raise RuntimeError("fastconv: no CUDA stream without torch's CUDA build")


def poison(on: bool) -> None:
    """Tests: whether the C++ replay fills each output with NaN before the launch (an unwritten element shows)."""
    global _POISON
    _POISON = on
    if _replay_fn():
        import fastconv._C as ext

        _setup(ext)


class Replay:
    """One call signature's launches, replayed (module doc). `compute(*inputs)` runs the call through the op's
    Python path and returns (outputs, seen): its output tensors (a tuple) and, per input, the tensor the launches
    read for it: the input itself or one `input.contiguous(memory_format=torch.channels_last)` (an input no launch
    reads only has its specs checked). A call returns the outputs, or with `single` the first one. Buffers the
    launches get from `workspace` are allocated afresh by each replay, ticket counters are kept (the replay then
    holds only on the stream it learned on)."""

    __slots__ = ("compute", "single", "entry", "misses", "skip")

    def __init__(self, compute, single: bool = True):
        self.compute = compute
        self.single = single
        self.entry = None
        self.misses = 0  # calls in a row that could not be learned
        self.skip = 0  # calls left that run compute without learning (after misses: 2, 4, ... 1024 of them)

    def __call__(self, *inputs):
        """compute(*inputs)'s outputs (with `single`: the first)."""
        entry = self.entry
        if entry is not None:
            out = _replay(entry, inputs)
            if out is not None:
                if _launch._recorder.get() is None:  # launched (not a dry run)
                    _launch.LAUNCHES["replay"] += 1
                return out[0] if self.single else out[:entry[6]]
        if self.skip or not _replay_fn():
            self.skip = max(self.skip - 1, 0)
            outputs = self.compute(*inputs)[0]
        else:
            outputs = self.learn(inputs)
        return outputs[0] if self.single else outputs

    def learn(self, inputs: tuple) -> tuple:
        """compute(*inputs)'s outputs, its launches learned on the way."""
        token, noted = _launch._capture.set([]), _common.allocations.set([])
        versions = [t._version for t in inputs]
        try:
            outputs, seen = self.compute(*inputs)
            captured, allocated = _launch._capture.get(), _common.allocations.get()
        finally:
            _launch._capture.reset(token)
            _common.allocations.reset(noted)
        # an input a PyTorch op wrote in place (e.g. running statistics the kernels could not index): the replay
        # would not do it
        unchanged = all(t._version == v for t, v in zip(inputs, versions))
        entry = replay_entry(captured, inputs, seen, outputs, allocated) if unchanged else None
        if entry is not None:
            self.entry, self.misses = entry, 0
        else:  # (the last entry stays: it is checked again on every call) learn again after a while, not each call
            self.misses += 1
            self.skip = min(2 ** self.misses, 1024)
        return outputs


def compiled_launcher(kernel, args: tuple, kwargs: dict, device: torch.device, dry: bool):
    """(run, function, packed metadata, every bound argument) of a launch whose key has a compiled kernel (a
    direct launch made it), run etc. None for a dry one; None where the launch cannot go direct. (Tests
    replace this to replay on CPU through the interpreter.)"""
    direct = _launch._direct_of(kernel)
    if direct is None or getattr(kernel, "pre_run_hooks", None):
        return None
    if dry:
        keyed = direct.key(args, kwargs, 0, _launch._launch_key)
        return None if keyed is None else (None, None, None, keyed[1])
    if device.type != "cuda":
        return None
    keyed = direct.key(args, kwargs, _launch.device_index(device), _launch._launch_key)
    hit = None if keyed is None else direct.compiled.get(keyed[0])
    return None if hit is None else (*hit, keyed[1])


def replay_entry(captured: list, inputs: tuple, seen: tuple, outputs: tuple, allocated: list = ()) -> tuple | None:
    """The _triton_replay entry (csrc/triton_launch.h) of a call that made the launches `captured` (in order), or
    None. allocated: the (kind, tensor) buffers _common.noted recorded during the call."""
    if (not captured or any(c is None for c in captured) or len(seen) != len(inputs) or not inputs
            or not outputs):
        return None  # no launch, or an autotuning call (its candidates' launches: launch.TUNING marks them)
    first = inputs[0]
    roles = {}
    in_specs = []
    for i, (t, s) in enumerate(zip(inputs, seen)):
        copied = s is not t
        if t.device != first.device or (copied and not (
                s.shape == t.shape and s.dtype == t.dtype and s.device == t.device
                and s.is_contiguous(memory_format=torch.channels_last))):
            return None  # not what the C++ replay can make of the input
        roles.setdefault(id(s), i)
        in_specs.append((tuple(t.shape), tuple(t.stride()), t.dtype, s.data_ptr() % 16 == 0, copied))
    allocs = list(outputs)  # what each replay allocates: the outputs, then the scratch the launches use
    for j, y in enumerate(outputs):
        if y.device != first.device:
            return None
        roles.setdefault(id(y), len(inputs) + j)
    scratch = {id(t): t for kind, t in allocated if kind == "scratch"}
    persistent = {id(t) for kind, t in allocated if kind == "persistent"}
    launches, used, dry = [], set(), captured[0][5]
    for kernel, grid, args, kwargs, device, launch_dry in captured:
        found = compiled_launcher(kernel, args, kwargs, device, dry) if launch_dry == dry else None
        if found is None:
            return None
        run, function, metadata, full = found
        slots = []
        template = list(full)
        for pos, v in enumerate(full):
            if not isinstance(v, torch.Tensor):
                continue
            src = roles.get(id(v))
            if src is None and id(v) in scratch and v.device == first.device:
                src = roles[id(v)] = len(inputs) + len(allocs)
                allocs.append(v)
            if src is not None:
                slots.append((pos, src))
                used.add(src)
                template[pos] = None  # the entry keeps no tensor of this call alive
            elif id(v) not in persistent:  # a tensor the next call would not supply (a cached or computed buffer)
                return None
        grid = (tuple(int(g) for g in grid) + (1, 1))[:3]
        launches.append((run, function, metadata, grid, tuple(template), tuple(slots)))
    if any(len(inputs) + j not in used for j in range(len(outputs))):
        return None  # an output no launch wrote (made by a PyTorch op): the replay could not make it
    if first.device.type == "cuda":
        index = _launch.device_index(first.device)
        stream = torch._C._cuda_getCurrentRawStream(index) if persistent and not dry else None
    else:
        index, stream = -1, None
    if any(y._version for y in allocs):  # written by a PyTorch op as well (a zero fill, an add): not the launches'
        return None
    out_specs = tuple((tuple(y.shape), tuple(y.stride()), y.dtype) for y in allocs)
    return (tuple(launches), tuple(in_specs), out_specs, index, bool(dry), stream, len(outputs))
