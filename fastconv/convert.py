"""fastconv.convert(model): run an existing model on fastconv's kernels, with conv -> BatchNorm2d ->
activation (-> + residual) fused into single `functional.conv_bn_act` calls, keeping the model's class,
its module tree and its state_dict (checkpoints load both ways, strict).

How the state_dict survives fusion: nothing moves. The conv stays where it was, retyped (`__class__`, so
its identity, parameters and hooks stay) to FusedConv2d, which holds an unregistered reference to its
BatchNorm2d and the activation's name. The BatchNorm2d stays where it was, retyped to
PassThroughBatchNorm2d: same parameters, buffers and state_dict, identity forward; the fused conv reads its
parameters, running statistics, `training`, momentum and eps at every call, so .train()/.eval()/.to()
and load_state_dict keep working.

Where fusion happens:
  * nn.Sequential: runs [Conv2d, BatchNorm2d, activation?] are fused in place; the activation's slot
    becomes nn.Identity (activations hold no state, so the keys do not change).
  * other modules that own a BatchNorm2d (directly, or in a ModuleList/ModuleDict): the module's own
    forward is traced with torch.fx, every submodule a leaf, so one module's code is fused at a time.
    Each matched conv -> bn -> [add] -> [act] chain becomes one call of the conv module, with the
    residual as its second argument, and the generated code becomes that module's `forward` (an instance
    attribute, see _InstanceForward): the module keeps its class and methods, and calling any submodule
    directly gives the converted model's result. A module that does not trace, or whose forward branches
    on self.training (a traced graph would freeze the branch), keeps its forward (convs and max-pools are
    still swapped) and convert() warns why. As with any fx tracing, other Python-level state the forward
    reads (flags, sizes) is frozen at conversion time.

Backend pinning: convert(backend=...) wraps the returned model's forward (the same instance-attribute
forward) in `fastconv.backend(name)`, so its ops, and their backward, run on that backend whatever the
caller's context.
"""
from __future__ import annotations

import copy
import importlib
import operator
import types
import warnings
from collections import Counter

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import _activations, _backend, modules
from ._args import conv_output_size

__all__ = ["convert", "FusedConv2d", "PassThroughBatchNorm2d"]

_ACT_MODULES = _activations.BY_MODULE
_ACT_FUNCTIONS = {F.relu: "relu", F.relu_: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                  F.silu: "silu", F.hardswish: "hardswish"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ACT_TORCH = _activations.FUNCTIONS
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class FusedConv2d(modules.Conv2d):
    """A fastconv.Conv2d that also applies the BatchNorm2d it was fused with (`_fused_bn`, not a
    registered submodule: its parameters and buffers keep their own state_dict keys), an optional
    residual and `activation`, as nn.BatchNorm2d would in train() and eval(). Made by convert()."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        bn = self._fused_bn
        if isinstance(input, modules.PendingBlock):  # the previous block's virtual output (modules.chain_start)
            return modules.consume_pending(self, input, residual)
        if residual is None or self._fits(input, residual):
            return modules.fused_conv_bn_forward(self, bn, self.activation, input, residual)
        # A residual that broadcasts (or is not a tensor): add it outside the kernel.
        return _ACT_TORCH[self.activation](modules.fused_conv_bn_forward(self, bn, "identity", input) + residual)

    def _fits(self, input, residual) -> bool:
        if not isinstance(residual, torch.Tensor) or residual.dtype != input.dtype or input.dim() != 4:
            return False
        w_lo, w_hi, h_lo, h_hi = self._reversed_padding_repeated_twice  # also right for 'same'/'valid'
        out_hw = [conv_output_size(size, k, s, lo, hi, d) for size, k, s, (lo, hi), d in zip(
            input.shape[2:], self.kernel_size, self.stride, ((h_lo, h_hi), (w_lo, w_hi)), self.dilation)]
        return residual.shape == (input.shape[0], self.out_channels, *out_hw)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused=BatchNorm2d({self._fused_bn.num_features})+{self.activation}"


class PassThroughBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d applied by the FusedConv2d it was fused into: same parameters, buffers and
    state_dict as nn.BatchNorm2d, identity forward. Made by convert()."""

    fused_into_conv = True  # a FusedSequential chain steps over it (modules._passes_through)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused into the preceding conv"


class _InstanceForward:
    """Stands in for `module.forward` as an instance attribute (so the module keeps its class, methods
    and state_dict): runs the fx-generated source `code` with the module as `self`, or without `code` the
    class's forward, under fastconv.backend(backend) when a backend is pinned. Deep-copies and pickles
    along with its module (the function is recompiled from `code`)."""

    def __init__(self, module: nn.Module, code: str | None = None, globals_: dict | None = None,
                 backend: str | None = None):
        self.__setstate__({"module": module, "code": code, "globals": globals_ or {}, "backend": backend})

    def __call__(self, *args, **kwargs):
        fn = self.fn or type(self.module).forward
        if self.backend is None:
            return fn(self.module, *args, **kwargs)
        with _backend.backend(self.backend):
            return fn(self.module, *args, **kwargs)

    def __getstate__(self):
        names = {k: _ModuleName(v.__name__) for k, v in self.globals.items() if isinstance(v, types.ModuleType)}
        return {"module": self.module, "code": self.code, "globals": {**self.globals, **names},
                "backend": self.backend}

    def __setstate__(self, state):
        self.module, self.code, self.backend = state["module"], state["code"], state["backend"]
        self.globals = {k: v.load() if isinstance(v, _ModuleName) else v for k, v in state["globals"].items()}
        self.fn = None
        if self.code is not None:
            namespace = dict(self.globals)
            exec(compile(self.code, f"<fastconv.convert: {type(self.module).__name__}.forward>", "exec"), namespace)
            self.fn = namespace["forward"]


class _ModuleName(str):
    def load(self):
        return importlib.import_module(self)


def convert(model: nn.Module, *, fuse: bool = True, backend: str | None = None, inplace: bool = False) -> nn.Module:
    """`model` on fastconv kernels: every nn.Conv2d becomes a fastconv.Conv2d and every nn.MaxPool2d a
    fastconv.MaxPool2d (by retyping: parameters, attributes and hooks are kept; subclasses of those
    classes, which may override forward, are left alone). With `fuse`, conv -> BatchNorm2d ->
    [+ residual] -> [ReLU/ReLU6/SiLU/Hardswish] chains run as one `functional.conv_bn_act` call (see the
    module doc). Modules carrying forward/backward hooks, or registered at more than one place, are never
    fused away. The model's class and state_dict keys are unchanged, so checkpoints load both ways.

    `inplace=False` converts a deep copy. `backend` pins the backend the returned model's forward runs on
    (its forward is wrapped in `fastconv.backend(backend)`; backward reuses the forward's choice); calling
    a submodule directly is not pinned."""
    if backend is not None:
        _backend._check_name(backend)
    if not inplace:
        model = copy.deepcopy(model)
    if fuse:
        shared = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        for name, module in list(model.named_modules()):
            if _is_plain_sequential(module):
                _fuse_sequential(module, shared)
            elif _should_trace(module):
                graph, why_not = _trace(module)
                if graph is None:
                    warnings.warn(
                        f"fastconv.convert: fusion via torch.fx tracing was skipped for {name or 'the model'} "
                        f"({type(module).__name__}) because {why_not}. Its convolutions and max-pools are still "
                        f"swapped, and nn.Sequential conv-BatchNorm-activation runs inside it are still fused.",
                        stacklevel=2)
                else:
                    _fuse_graph(module, graph, shared)
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = modules.Conv2d
            module.algo = "implicit"
        elif type(module) is nn.MaxPool2d:
            _retype(module, modules.MaxPool2d, module.kernel_size, module.stride, module.padding,
                    module.dilation, module.return_indices, module.ceil_mode)
    if backend is not None:
        forward = model.__dict__.get("forward")
        if isinstance(forward, _InstanceForward):
            forward.backend = backend
        elif forward is None:
            model.forward = _InstanceForward(model, backend=backend)
        else:
            raise ValueError("convert(backend=...) cannot pin a model whose forward is an instance attribute")
    return model


def _retype(module: nn.Module, cls: type, *args) -> None:
    """Make `module` a `cls` in place, adding the attributes cls(*args) has that `module` lacks."""
    for key, value in vars(cls(*args)).items():
        module.__dict__.setdefault(key, value)
    module.__class__ = cls


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, h, None) for h in _HOOKS)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _should_trace(module: nn.Module) -> bool:
    """Only modules owning a BatchNorm2d directly (or through a ModuleList/ModuleDict) have anything to
    fuse in their own forward. torch's and fastconv's own modules are not traced, nor a module whose forward
    is an instance attribute (fx would trace the class's)."""
    kind = type(module).__module__
    if kind.startswith("torch.") or kind in (modules.__name__, __name__) or "forward" in module.__dict__:
        return False

    def owns_bn(m):
        return any(type(c) is nn.BatchNorm2d or (isinstance(c, (nn.ModuleList, nn.ModuleDict)) and owns_bn(c))
                   for c in m.children())

    return owns_bn(module)


def _conv_bn_pair(conv, bn, shared) -> bool:
    return (type(conv) in (nn.Conv2d, modules.Conv2d) and type(bn) is nn.BatchNorm2d
            and bn.num_features == conv.out_channels and not _has_hooks(conv) and not _has_hooks(bn)
            and shared[id(conv)] == 1 and shared[id(bn)] == 1)


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str) -> None:
    conv.__class__ = FusedConv2d
    conv.__dict__.setdefault("algo", "implicit")
    conv.activation = activation
    object.__setattr__(conv, "_fused_bn", bn)  # a reference, not a submodule: no new state_dict keys
    bn.__class__ = PassThroughBatchNorm2d


def _fuse_sequential(seq: nn.Sequential, shared) -> None:
    items = list(seq._modules.items())
    i = 0
    while i + 1 < len(items):
        conv, bn = items[i][1], items[i + 1][1]
        if not _conv_bn_pair(conv, bn, shared):
            i += 1
            continue
        act = items[i + 2][1] if i + 2 < len(items) else None
        activation = _ACT_MODULES.get(type(act)) if not _has_hooks(act) else None
        if activation:
            seq._modules[items[i + 2][0]] = nn.Identity()
        _fuse(conv, bn, activation or "identity")
        i += 3 if activation else 2
    _chain_sequential(seq)


def _chain_sequential(seq: nn.Sequential) -> None:
    """Retype `seq` to FusedSequential (same modules and state_dict) when two of its fused blocks follow each
    other (over identities and fused-away BatchNorms): in training on Triton their intermediate output is
    then never materialised (modules.FusedSequential)."""
    if modules.has_chain(list(seq._modules.values())):
        seq.__class__ = modules.FusedSequential


def _chain_graph(graph: torch.fx.Graph, fused_nodes: set, submodules: dict) -> None:
    """Where a fused call without residual has one user, another fused call taking it as its input (ResNet's
    conv1 -> conv2), call it through modules.chain_start: in training on Triton the producer then hands the
    consumer a PendingBlock (its output, never materialised; see modules.FusedSequential), else its output.
    Where that one user is a max-pool module (torchvision ResNet's stem), call both through
    modules.pool_start: the block's output is then pooled as it is normalised, never materialised."""
    _chain_pairs(graph, fused_nodes)
    _residual_blocks(graph, submodules)
    for node in list(graph.nodes):
        if node not in fused_nodes or len(node.args) != 1:
            continue
        user = _only_user(node)
        if (user is None or user.op != "call_module" or user.args != (node,) or user.kwargs
                or not isinstance(submodules.get(user.target), nn.MaxPool2d)):
            continue
        with graph.inserting_before(node):
            producer, pool = graph.get_attr(node.target), graph.get_attr(user.target)
            pooled = graph.call_function(modules.pool_start, (producer, pool, node.args[0]))
        user.replace_all_uses_with(pooled)
        graph.erase_node(user)
        graph.erase_node(node)


def _chain_pairs(graph: torch.fx.Graph, fused_nodes: set) -> None:
    for node in list(graph.nodes):
        if node not in fused_nodes or len(node.args) != 1:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0] not in fused_nodes or users[0].args[0] is not node or node in users[0].args[1:]:
            continue
        with graph.inserting_before(node):
            producer, consumer = graph.get_attr(node.target), graph.get_attr(users[0].target)
            started = graph.call_function(modules.chain_start, (producer, consumer, node.args[0]))
        node.replace_all_uses_with(started)
        graph.erase_node(node)


def _residual_blocks(graph: torch.fx.Graph, submodules: dict) -> None:
    """ResNet's block after _chain_pairs: pending = chain_start(conv1, conv2, x); out = conv2(pending, r) with
    r = x or r = shortcut(x) (a module call used only there) -> out = modules.residual_block(conv1, conv2,
    shortcut or None, x): one autograd node for both uses of x where it can run as one op (training, Triton)."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not modules.chain_start:
            continue
        producer, consumer, x = node.args
        user = _only_user(node)
        if (user is None or user.op != "call_module" or user.target != consumer.target or user.kwargs
                or len(user.args) != 2 or user.args[0] is not node):
            continue
        r = user.args[1]
        shortcut = None
        if r is not x:
            if (not isinstance(r, torch.fx.Node) or r.op != "call_module" or r.args != (x,) or r.kwargs
                    or _only_user(r) is not user or not isinstance(submodules.get(r.target), nn.Module)):
                continue
            shortcut = r
        with graph.inserting_before(user):
            short = graph.get_attr(shortcut.target) if shortcut is not None else None
            block = graph.call_function(modules.residual_block, (producer, consumer, short, x))
        user.replace_all_uses_with(block)
        graph.erase_node(user)
        if shortcut is not None:
            graph.erase_node(shortcut)
        graph.erase_node(node)


class _OwnCodeTracer(torch.fx.Tracer):
    """Traces only the root module's own forward: every submodule call is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root


def _trace(module: nn.Module) -> tuple[torch.fx.Graph | None, str]:
    """(graph of the module's own forward, "") or (None, why it cannot be fused through tracing). The
    code is traced in both training modes: fx bakes `if self.training:` into the graph, so a forward that
    branches on it is not replaced."""
    mode, sources = module.training, []
    try:
        for training in (not mode, mode):
            module.training = training
            graph = _OwnCodeTracer().trace(module)
            sources.append(graph.python_code(root_module="self").src)
    except Exception as e:  # noqa: BLE001 - whatever fx raises means: this forward does not trace
        return None, f"its forward does not trace: {type(e).__name__}: {e}"
    finally:
        module.training = mode
    if sources[0] != sources[1]:
        return None, "its forward depends on self.training, which a traced graph would freeze"
    return graph, ""


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _activation(node, tail, submodules) -> str | None:
    """The activation `node` applies to `tail` (and nothing else), or None."""
    if node is None or not node.args or node.args[0] is not tail:
        return None
    if node.op == "call_module":
        m = submodules[node.target]
        return _ACT_MODULES.get(type(m)) if len(node.args) == 1 and not node.kwargs and not _has_hooks(m) else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        extra = list(node.args[1:]) + [v for k, v in node.kwargs.items() if k == "inplace"]
        if len(node.args) <= 2 and set(node.kwargs) <= {"inplace"} and all(isinstance(v, bool) for v in extra):
            return _ACT_FUNCTIONS[node.target]
        return None
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACT_METHODS[node.target]
    return None


def _residual(node, tail):
    """The other operand if `node` is `tail + other` (or other + tail) for an fx Node `other`, else None."""
    if node is None or node.kwargs or len(node.args) != 2 or tail not in node.args:
        return None
    if not ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_"))):
        return None
    other = node.args[1] if node.args[0] is tail else node.args[0]
    return other if isinstance(other, torch.fx.Node) and other is not tail else None


def _written_between(value, first, last, submodules) -> bool:
    """Whether a node between `first` and `last` may write `value` in place (conservatively)."""
    node = first.next
    while node is not last:
        if node.args and node.args[0] is value:
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
            if (name.endswith("_") or node.kwargs.get("inplace") or any(a is True for a in node.args[1:])
                    or (node.op == "call_module" and getattr(submodules[node.target], "inplace", False))):
                return True
        node = node.next
    return False


def _fuse_graph(module: nn.Module, graph: torch.fx.Graph, shared) -> None:
    """Replace each conv -> bn -> [add] -> [act] chain in `module`'s traced graph by one call of the conv
    module (residual as its 2nd argument); if any, install the new code as the module's forward."""
    submodules = dict(module.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    fusions, erased = [], set()
    for conv_node in list(graph.nodes):
        if conv_node in erased or conv_node.op != "call_module" or len(conv_node.args) != 1 or conv_node.kwargs:
            continue
        bn_node = _only_user(conv_node)
        if (bn_node is None or bn_node.op != "call_module" or bn_node.args != (conv_node,) or bn_node.kwargs
                or calls[conv_node.target] != 1 or calls[bn_node.target] != 1):
            continue
        conv, bn = submodules[conv_node.target], submodules[bn_node.target]
        if not _conv_bn_pair(conv, bn, shared):
            continue
        chain = [conv_node, bn_node]
        add_node = _only_user(bn_node)
        residual = _residual(add_node, bn_node)
        x = conv_node.args[0]
        if residual is not None and not _written_between(x, conv_node, add_node, submodules):
            chain.append(add_node)
        else:
            residual = None
        act_node = _only_user(chain[-1])
        activation = _activation(act_node, chain[-1], submodules)
        if activation:
            chain.append(act_node)
        # The fused call reads the conv's input at the add (where the residual exists) or at the conv.
        with graph.inserting_before(chain[2] if residual is not None else conv_node):
            fused_node = graph.call_module(conv_node.target, (x,) if residual is None else (x, residual))
        chain[-1].replace_all_uses_with(fused_node)
        for node in reversed(chain):
            graph.erase_node(node)
        erased.update(chain)
        fusions.append((conv, bn, activation or "identity", fused_node))
    if fusions:
        _chain_graph(graph, {f[3] for f in fusions}, submodules)
        graph.lint()
        code = graph.python_code(root_module="self")
        module.forward = _InstanceForward(module, code.src, code.globals)
        for conv, bn, activation, _ in fusions:
            _fuse(conv, bn, activation)
