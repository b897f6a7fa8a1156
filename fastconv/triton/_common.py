"""Helpers shared by every Triton launcher: interpreter detection, dtype rules, index width."""
from __future__ import annotations

import contextvars

import torch
import triton.language as tl

from .._activations import CODES as ACTIVATIONS  # noqa: F401 (the fused epilogue's activation codes)
from .._args import channels_strided  # noqa: F401 (one definition; re-exported)
from .._backend import conv_tf32_allowed, interpreting, planning  # noqa: F401 (one definition; re-exported)

INT32_LIMIT = 2**31 - 1
# GEMM rows, pixel blocks and split-K chunks may run up to one block past the end of what they index (masked
# lanes); int32 math must leave them that room.
INDEX_HEADROOM = 2**16




def check_runnable(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors with the interpreter switched on."""
    for t in tensors:
        if t is None or t.is_cuda:
            continue
        if planning() or (t.device.type == "cpu" and interpreting()):
            continue
        raise RuntimeError(
            f"fastconv triton backend: not supported for {t.device.type} tensors because Triton kernels run "
            "on CUDA devices (or on CPU only under the interpreter, TRITON_INTERPRET=1 set before import). "
            "Use fastconv.backend('torch') for CPU tensors."
        )


def acc_dtype(dtype: torch.dtype):
    """Accumulator type: fp64 for fp64 operands (gradcheck), fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. fp32 follows cuDNN's conv TF32 setting exactly as nn.Conv2d does (conv_tf32_allowed)."""
    if dtype == torch.float32 and conv_tf32_allowed():
        return "tf32"
    return "ieee"


def upcast_dot_operands(dtype: torch.dtype) -> bool:
    """The interpreter's tl.dot returns garbage for bfloat16 operands (triton 3.7-3.9); only there do we
    convert the bf16 tiles to fp32 before the dot. Compiled GPU code keeps bf16 tensor-core dots."""
    return dtype == torch.bfloat16 and interpreting()


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset (or a row or pixel index past a tensor's end, see INDEX_HEADROOM) can pass
    2**31 - 1; then kernels use int64 math."""
    limit = INT32_LIMIT - INDEX_HEADROOM
    for t in tensors:
        if t is None:
            continue
        if t.numel() > limit:
            return True
        # a dense tensor spans its numel (the common case: no Python loop over its strides on every launch)
        if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
            continue
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)
        if span > limit:
            return True
    return False


def channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself if its channels (dim 1) are contiguous, else a channels_last copy.

    The GEMM loops of the conv kernels load [pixels, channels] tiles of activations and [channels, channels]
    tiles of weights with the reduction over channels. With channels at stride 1 those loads are vector
    loads that Triton pipelines through shared memory (cp.async / TMA); NCHW operands turn every element
    into its own 64-bit address and scalar load, which spills registers and disables the multi-stage
    pipeline (see the kernel report). So, like cuDNN for tensor-core convs, the launchers pay one layout
    copy of such operands; outputs keep the caller's layout (the epilogue writes through any strides)."""
    return t.contiguous(memory_format=torch.channels_last) if channels_strided(t) else t


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with t's shape, strides and dtype: launch plans derive strides and index widths from it
    without holding t."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def meta_operand(t: torch.Tensor) -> torch.Tensor:
    """meta_like(channels_contiguous(t)): what a launcher will pass for t, allocated as such (no clone op: the
    launch plan would count a copy of a meta stand-in as a kernel of the step)."""
    if not channels_strided(t):
        return meta_like(t)
    return torch.empty(t.shape, dtype=t.dtype, device="meta", memory_format=torch.channels_last)


class PlanCache:
    """Launch plans of one launcher, per call signature: what a launch needs besides its tensors (shapes,
    integer arguments, constexprs, grid), worked out once per signature so that a repeated call costs a dict
    lookup. Bounded: past `limit` signatures new ones are worked out per call, never stored (a program
    that keeps changing shapes does not grow it without end). Plans must hold no tensors."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._plans: dict = {}

    def get(self, key):
        return self._plans.get(key)

    def put(self, key, plan):
        if len(self._plans) < self.limit:
            self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


# Host-side integer helpers. triton.cdiv / triton.next_power_of_2 are Triton constexpr functions: called from
# Python they cost microseconds each through Triton's JIT wrapper, on every launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (and >= 1)."""
    return 1 << max(int(n) - 1, 0).bit_length()


_TICKETS: dict = {}

# While a Replay (replay.py) learns a call: the buffers its launches got besides the call's own tensors, as
# ("scratch", t) (workspace: every element overwritten by the launches, so a replay allocates its own) or
# ("persistent", t) (ticket counters: kept from launch to launch on their stream).
allocations: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastconv_replay_allocations",
                                                                         default=None)


def noted(kind: str, t: torch.Tensor) -> torch.Tensor:
    """t, recorded in `allocations` as `kind` while a Replay learns."""
    seen = allocations.get()
    if seen is not None:
        seen.append((kind, t))
    return t


def ticket_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 counters for "last program finishes the reduction" tickets (the BatchNorm backward's and the
    split-K wgrad's reductions) on `device` and its current stream. They are zero between launches: every launch's
    last program per counter resets it. One set per (device, stream): launches on one stream run in order, so they
    never use the counters at the same time."""
    # the raw stream handle (what Inductor's launchers read): no torch.cuda.Stream object per launch
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (device, stream)
    counters = _TICKETS.get(key)
    if counters is None or counters.numel() < n:
        counters = _TICKETS[key] = torch.zeros(max(n, 256), device=device, dtype=torch.int32)
    return noted("persistent", counters)
