"""Custom ops that mutate optional arguments (the running statistics and num_batches_tracked of the training
BatchNorm ops) on torch < 2.12.

torch.library.custom_op gives such an op an ADInplaceOrView kernel that bumps the version counter of every mutated
argument. Before torch 2.12 that kernel indexes the arguments by schema position, so a direct `torch.ops` call that
leaves a trailing mutable argument out raises IndexError, and one that passes None raises TypeError. torch 2.12
skips the missing ones. `lenient_inplace_view(op)` installs the 2.12 behaviour on older torch: bump the version of
the mutated arguments that are tensors, then redispatch below ADInplaceOrView (for an op that is not a view, which
is all the fallback kernel would do)."""
from __future__ import annotations

import torch

# torch 2.12's ADInplaceOrView kernel for custom ops skips omitted mutable arguments
_FIXED_UPSTREAM = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 12)


def lenient_inplace_view(op) -> None:
    """For a torch.library.custom_op `op` with a mutable schema: on torch < 2.12, an ADInplaceOrView kernel that
    takes omitted or None mutable arguments (a no-op on newer torch)."""
    if _FIXED_UPSTREAM:
        return
    overload = op._opoverload
    schema = overload._schema
    assert schema.is_mutable and not schema._is_view_op(), schema
    mutated = [(i, a.name) for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    below = torch._C._after_ADInplaceOrView_keyset

    def ad_inplace_or_view(keyset, *args, **kwargs):
        for idx, name in mutated:
            value = args[idx] if idx < len(args) else kwargs.get(name)
            if isinstance(value, torch.Tensor):
                torch.autograd.graph.increment_version(value)
        return overload.redispatch(keyset & below, *args, **kwargs)

    op._lib.impl(schema.name.split("::")[1], ad_inplace_or_view, "ADInplaceOrView", with_keyset=True,
                 allow_override=True)
