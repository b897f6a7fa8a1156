"""Autocast for fastconv custom ops with nn.Conv2d's rule: inside torch.autocast, floating-point tensor
arguments (fp64 excepted, as ATen does) are cast to the autocast dtype of the device
(torch.get_autocast_dtype), whichever it is: fp16 or bf16. torch.library.register_autocast takes a fixed
dtype, so we register the same kind of kernel ourselves with the dtype read at call time."""
from __future__ import annotations

import torch


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != torch.float64:
            return value.to(dtype)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def register_autocast(lib: torch.library.Library, qualname: str, cast_args: tuple[int, ...] | None = None) -> None:
    """`cast_args`: positions of the arguments to cast (default: all). BatchNorm parameters, for instance,
    stay in fp32 under autocast, as nn.BatchNorm2d's do."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in ("cuda", "cpu"):
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(_keyset, *args, _device_type=device_type, _key=key):
            dtype = torch.get_autocast_dtype(_device_type)
            if cast_args is None:
                args = _cast(args, dtype)
            else:
                args = tuple(_cast(a, dtype) if i in cast_args else a for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        lib.impl(name, kernel, key_name, with_keyset=True)
