"""Turn an op into the callable one benchmark row times, per mode.

  fwd / eval        inference forward under torch.no_grad() (eval: BatchNorm folded, module in eval())
  train-fwd         training forward with autograd recording (what a training step's forward costs)
  bwd / train-bwd   backward alone: gradients of inputs and parameters from a retained graph
  fwd+bwd           forward then backward (torch.autograd.grad, so no .grad accumulation is timed)
"""
from __future__ import annotations

import contextlib

import torch

from ._inputs import Rotation

BASE = {"fwd": "infer", "eval": "infer", "train-fwd": "record", "bwd": "bwd", "train-bwd": "bwd",
        "fwd+bwd": "fwd+bwd", "train-fwd+bwd": "fwd+bwd"}


def needs_grad(mode: str) -> bool:
    return BASE[mode] != "infer"


def timed(f, make_set, mode: str, device: torch.device, forward_ctx=contextlib.nullcontext, params=()):
    """The callable for one row. make_set() -> (inputs tuple, grad_output or None) builds one fresh input set
    (inputs requiring grad when the mode differentiates); forward_ctx() wraps each forward (backend choice,
    autocast); params are extra tensors to differentiate (module parameters)."""
    base = BASE[mode]

    def targets(inputs):
        return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)

    if base == "bwd":
        def make():
            inputs, g = make_set()
            with forward_ctx():
                out = f(*inputs)
            return out, targets(inputs), g

        rot = Rotation(make, device)

        def fn():
            out, wrt, g = rot.next()
            torch.autograd.grad(out, wrt, g, retain_graph=True)
        return fn

    rot = Rotation(make_set, device)
    if base == "infer":
        def fn():
            inputs, _ = rot.next()
            with forward_ctx(), torch.no_grad():
                f(*inputs)
    elif base == "record":
        def fn():
            inputs, _ = rot.next()
            with forward_ctx():
                f(*inputs)
    else:
        def fn():
            inputs, g = rot.next()
            with forward_ctx():
                out = f(*inputs)
            torch.autograd.grad(out, targets(inputs), g)
    return fn
