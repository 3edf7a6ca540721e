"""Which output channels of which convolutions must be removed together (a torch.fx pass).

Removing feature map ``c`` of a conv is only a smaller network if every tensor that carries that
channel loses it too: the BatchNorm over it, a depthwise conv over it, the other branch of a
residual add (whose channel ``c`` is summed with it), and the input columns of the layers that
consume it (a conv's input channel, a Linear's ``H*W`` flattened features, an offset inside a
concatenation). We trace the model with ``torch.fx``, propagate shapes once with an example input,
and follow the channel dimension through the graph: producers that meet in an elementwise op are
unioned into one :class:`ChannelGroup`. Ops we cannot follow are named in the error so the user can
exclude the layers that feed them. Channels that reach the model's output (a classifier conv) are
never pruned.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

#: modules and functions that keep the channel dimension as it is
_SAME_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d,
)
_SAME_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, torch.sigmoid, torch.tanh,
    F.sigmoid, F.tanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout,
    F.interpolate, torch.clone,
}
_SAME_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "detach", "type_as"}
_ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
                torch.add, torch.sub, torch.mul, torch.div, "add", "add_", "sub", "mul", "mul_", "div"}
_REDUCE = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}


class CouplingError(ValueError):
    """The channel dimension passes through ops this pass cannot follow."""


@dataclass
class ChannelGroup:
    """Output channels shared by ``producers`` (convs with groups=1) and removed together."""

    producers: list[str]
    channels: int
    #: (module name, first channel): channel c of this group is channel ``offset + c`` there
    batchnorms: list[tuple[str, int]] = field(default_factory=list)
    depthwise: list[tuple[str, int]] = field(default_factory=list)
    #: (module name, first input column, columns per channel): channel c of this group is input
    #: columns ``offset + c * repeat ... offset + (c + 1) * repeat - 1`` of that consumer
    consumers: list[tuple[str, int, int]] = field(default_factory=list)
    #: why the group cannot be pruned (reaches the output), or None
    locked: Optional[str] = None
    #: ops the channel dimension passes through that the pass cannot follow
    unresolved: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.producers[0]


@dataclass(frozen=True)
class _Ch:
    """Channel layout of a tensor: segments (group id, size) along dim 1, columns per channel."""

    segs: tuple[tuple[int, int], ...]
    repeat: int = 1


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nodes_in(args: Iterable[Any]) -> list[fx.Node]:
    out: list[fx.Node] = []
    for a in args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_nodes_in(a))
        elif isinstance(a, dict):
            out.extend(_nodes_in(a.values()))
    return out


class _Analysis:
    def __init__(self, model: nn.Module, example_input: Any):
        self.model = model
        self.modules = dict(model.named_modules())
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - report what fx says, with the fix
            raise CouplingError(
                f"cannot trace the model with torch.fx to find coupled channels ({exc}). Make forward() "
                f"traceable (no data-dependent control flow) or prune with granularity 'kernel' only"
            ) from exc
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        ShapeProp(self.gm).propagate(*inputs)
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []
        self.info: dict[fx.Node, _Ch] = {}

    # union-find over group ids
    def new_group(self, producer: str, channels: int) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup([producer], channels))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a

    def problem(self, ch: _Ch, what: str) -> None:
        for g, _ in ch.segs:
            self.groups[g].unresolved.append(what)

    def consume(self, module: str, ch: _Ch) -> None:
        offset = 0
        for g, size in ch.segs:
            self.groups[g].consumers.append((module, offset * ch.repeat, ch.repeat))
            offset += size

    def per_channel(self, module: str, ch: _Ch, kind: str) -> None:
        """A per-channel module (BatchNorm, depthwise conv) over the tensor's channels."""
        offset = 0
        for g, size in ch.segs:
            getattr(self.groups[g], kind).append((module, offset))
            offset += size

    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            tracked = [self.info[n] for n in _nodes_in(node.args) + _nodes_in(node.kwargs.values()) if n in self.info]
            out = self.step(node, tracked)
            if out is not None:
                self.info[node] = out
        return self.merge()

    def describe(self, node: fx.Node) -> str:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if node.op == "call_module":
            target = f"{target} ({type(self.modules[node.target]).__name__})"
        return f"{node.op} {target} (node {node.name})"

    def step(self, node: fx.Node, tracked: list[_Ch]) -> Optional[_Ch]:
        if node.op == "call_module":
            mod = self.modules[node.target]
            if isinstance(mod, nn.Conv2d):
                return self.conv(node, mod, tracked)
            if isinstance(mod, nn.Linear):
                if tracked:
                    shape = _shape(node.args[0])
                    if shape is not None and len(shape) == 2 and len(tracked) == 1:
                        self.consume(node.target, tracked[0])
                    else:
                        self.problem(tracked[0], self.describe(node) + " applied to a non-flattened feature map")
                return None
            if not tracked:
                return None
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                self.per_channel(node.target, tracked[0], "batchnorms")
                return tracked[0]
            if isinstance(mod, _SAME_MODULES):
                return tracked[0]
            if isinstance(mod, nn.Flatten):
                return self.flatten(node, tracked[0])
            self.problem(tracked[0], self.describe(node))
            return None
        if node.op in ("call_function", "call_method"):
            if not tracked:
                return None
            t = node.target
            if t in _SAME_FUNCTIONS or t in _SAME_METHODS:
                return tracked[0]
            if t in _ELEMENTWISE:
                first = tracked[0]
                for other in tracked[1:]:
                    if [s for _, s in other.segs] != [s for _, s in first.segs] or other.repeat != first.repeat:
                        self.problem(first, self.describe(node) + " between differently laid-out channels")
                        self.problem(other, self.describe(node) + " between differently laid-out channels")
                        continue
                    for (a, _), (b, _) in zip(first.segs, other.segs):
                        self.union(a, b)
                return first
            if t in (torch.cat, torch.concat):
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                shape = _shape(node)
                if shape is not None and dim in (1, 1 - len(shape)) and len(tracked) == len(_nodes_in(node.args[0])):
                    segs: tuple = ()
                    for ch in tracked:
                        segs += ch.segs
                    return _Ch(segs, tracked[0].repeat)
                self.problem(tracked[0], self.describe(node) + f" along dim {dim} or with untracked inputs")
                return None
            if t in (torch.flatten, "flatten", "view", "reshape"):
                return self.flatten(node, tracked[0])
            if t in _REDUCE:
                in_shape, out_shape = _shape(node.args[0]), _shape(node)
                if in_shape and out_shape and len(in_shape) >= 2 and len(out_shape) >= 2 and out_shape[1] == in_shape[1] \
                        and out_shape[0] == in_shape[0]:
                    return tracked[0]
            if t in ("size", "dim", "numel") or t is getattr or (t is operator.getitem and _shape(node) is None):
                return None  # shapes and sizes carry no channels
            self.problem(tracked[0], self.describe(node))
            return None
        if node.op == "output":
            for ch in tracked:
                for g, _ in ch.segs:
                    self.groups[g].locked = "reaches the model output"
        return None

    def conv(self, node: fx.Node, mod: nn.Conv2d, tracked: list[_Ch]) -> Optional[_Ch]:
        ch = tracked[0] if tracked else None
        if mod.groups == 1:
            if ch is not None:
                if ch.repeat != 1:
                    self.problem(ch, self.describe(node) + " applied to a flattened tensor")
                else:
                    self.consume(node.target, ch)
            return _Ch(((self.new_group(node.target, mod.out_channels), mod.out_channels),))
        if mod.groups == mod.in_channels == mod.out_channels:  # depthwise: channel c stays channel c
            if ch is None:
                return _Ch(((self.new_group(node.target, mod.out_channels), mod.out_channels),))
            self.per_channel(node.target, ch, "depthwise")
            return ch
        if ch is not None:
            self.problem(ch, self.describe(node) + f" (grouped conv, groups={mod.groups})")
        # its own output channels are coupled to its groups; never prune them
        g = self.new_group(node.target, mod.out_channels)
        self.groups[g].locked = f"grouped conv (groups={mod.groups})"
        return _Ch(((g, mod.out_channels),))

    def flatten(self, node: fx.Node, ch: _Ch) -> Optional[_Ch]:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if in_shape is None or out_shape is None:
            self.problem(ch, self.describe(node))
            return None
        if in_shape == out_shape:
            return ch
        if len(out_shape) == 2 and out_shape[0] == in_shape[0] and ch.repeat == 1:
            spatial = 1
            for s in in_shape[2:]:
                spatial *= s
            return _Ch(ch.segs, spatial)
        self.problem(ch, self.describe(node) + f" reshaping {list(in_shape)} to {list(out_shape)}")
        return None

    def merge(self) -> list[ChannelGroup]:
        classes: dict[int, ChannelGroup] = {}
        for g, grp in enumerate(self.groups):
            root = self.find(g)
            if root not in classes:
                classes[root] = ChannelGroup([], self.groups[root].channels)
            c = classes[root]
            if grp.channels != c.channels:
                c.unresolved.append(f"{grp.producers[0]} has {grp.channels} channels, coupled with {c.channels}")
            c.producers += grp.producers
            c.batchnorms += grp.batchnorms
            c.depthwise += grp.depthwise
            c.consumers += grp.consumers
            c.unresolved += grp.unresolved
            c.locked = c.locked or grp.locked
        return list(classes.values())


def channel_groups(model: nn.Module, example_input: Any,
                   couple: Optional[Iterable[Iterable[str]]] = None) -> list[ChannelGroup]:
    """Groups of coupled conv output channels of ``model`` (see the module docstring).

    ``couple`` adds couplings known from elsewhere (NNI's ``dependency_group_id``): each iterable
    of producer names is merged into one group.
    """
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            analysis = _Analysis(model, example_input)
            analysis.run()
    finally:
        model.train(was)
    ids = {g.producers[0]: i for i, g in enumerate(analysis.groups)}
    for names in couple or ():
        names = [n for n in names if n in ids]
        for n in names[1:]:
            analysis.union(ids[names[0]], ids[n])
    return analysis.merge()
