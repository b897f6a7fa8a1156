"""The eager fast path of fastconv's custom ops: the same implementation and the same autograd functions,
without torch.library's Python dispatch round trip (about 20 µs of host time per call).

Every op here is a torch.library custom op (schema, fake kernel, autograd, autocast), which is what tracing,
torch.compile, opcheck, FakeTensor, the launch plan and the profiler see. In plain eager mode — no compiler, no
dispatch mode (FakeTensorMode, the launch plan's), no profiler, no autocast, plain CPU/CUDA tensors (not a
subclass, whose __torch_function__ sees the op) — `FastOp` runs the op's own Python implementation directly,
through a torch.autograd.Function built from the op's registered setup_context/backward when a gradient is
needed: one autograd strategy, two entry points.
"""
from __future__ import annotations

import inspect

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_PARAMETER = torch.nn.Parameter


def eager(t: torch.Tensor) -> bool:
    """Whether an op call with first tensor argument `t` may skip the custom-op dispatch."""
    return not torch.compiler.is_compiling() and eager_uncompiled(t)


def eager_uncompiled(t: torch.Tensor) -> bool:
    """eager(t) for a caller that has found torch.compiler.is_compiling() False already."""
    if _get_current_dispatch_mode() is not None:
        return False
    if torch.autograd.profiler._is_profiler_enabled:  # the profiler names ops by their dispatch (fastconv::...)
        return False
    # a tensor subclass takes the custom op, whose dispatch calls its __torch_function__ (as nn's ops do: the
    # output is of the subclass); any autocast (the ops' autocast rules run in the dispatch); is_cuda / is_cpu:
    # t.device.type alone costs ~1.5 µs, more than the rest of this check
    return ((type(t) is torch.Tensor or type(t) is _PARAMETER) and (t.is_cuda or t.is_cpu)
            and not torch._C._is_any_autocast_enabled())


def impl_of(op):
    """The Python implementation behind a torch.library.custom_op."""
    return op._init_fn


class FastOp:
    """`op` (a custom op) with an eager entry point; `setup_context` / `backward` are the functions given to
    op.register_autograd (None: the op has no autograd). `checked`: the op's implementation after its
    argument checks, same signature, for an op whose callers in fastconv (the functional layer, backward
    functions) pass arguments they validated already; the custom op itself always checks. `mutated`:
    positions of the tensor arguments the op mutates (its mutates_args), whose version counters the eager
    path bumps as the dispatcher would."""

    def __init__(self, op, setup_context=None, backward=None, checked=None, mutated: tuple[int, ...] = ()):
        self.op = op
        self.impl = impl = checked or impl_of(op)
        # the op's defaults for trailing arguments a caller leaves out (setup_context sees every input)
        params = list(inspect.signature(impl_of(op)).parameters.values())
        self.arity = len(params)
        self.defaults = tuple(p.default for p in params)
        self.fn = None
        self.mutated = mutated
        if backward is not None:
            def forward(ctx, *args):
                # forward(ctx, ...) style, setup_context called here: torch's apply() binds the arguments of
                # a forward(*args) + setup_context pair with inspect.signature on every call (~17 µs).
                out = impl(*args)
                setup_context(ctx, args, out)
                return out

            self.fn = type(f"{op._name}_eager", (torch.autograd.Function,), {
                "forward": staticmethod(forward),
                "backward": staticmethod(backward),
            })

    def __call__(self, *args):
        if not eager(args[0]):
            return self.op(*args)
        if len(args) < self.arity:
            args = args + self.defaults[len(args):]
        if self.fn is not None and torch.is_grad_enabled() and any(
                isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            out = self.fn.apply(*args)
        else:
            out = self.impl(*args)
        for i in self.mutated:
            if i < len(args) and isinstance(args[i], torch.Tensor):
                torch.autograd.graph.increment_version(args[i])
        return out
