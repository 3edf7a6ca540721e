"""Which output channels of which layers must be removed together (a torch.fx pass).

Removing channel ``c`` of a conv (or output feature ``c`` of a Linear) is only a smaller network if
every tensor that carries that channel loses it too: the BatchNorm over it, a depthwise or grouped
conv over it, the other branch of a residual add (whose channel ``c`` is summed with it), a
squeeze-and-excite gate multiplied into it, a per-channel parameter (ConvNeXt's layer scale), and
the input columns of the layers that consume it (a conv's input channel, a Linear's input feature
or ``H*W`` flattened features, an offset inside a concatenation). We trace the model with
``torch.fx``, propagate shapes once with an example input, and follow the channel axis through the
graph, also where ``permute`` / ``reshape`` move it (channels-last blocks, token sequences):
producers that meet in an elementwise op are unioned into one :class:`ChannelGroup`.

Some groups can never shrink without changing what the model computes, so they are *locked* with the
reason: channels that reach the model's output, channels normalised together by LayerNorm /
GroupNorm (the statistics would change), the output of a grouped conv fed by an untracked tensor,
channels divided into parts that would each need equal, aligned removals (a ``chunk`` along the
channels, a ``view`` that splits the channel axis: ShuffleNetV2's halves and shuffle, attention heads).
Ops we cannot follow are named in ``unresolved`` so the user can exclude the layers that feed them;
a locked group's unresolved ops do not matter (it is never pruned).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from . import coupling_ops as ops


class CouplingError(ValueError):
    """The channel dimension passes through ops this pass cannot follow."""


@dataclass
class ChannelGroup:
    """Output channels shared by ``producers`` (convs with groups=1, Linear layers), removed together."""

    producers: list[str]
    channels: int
    #: (module name, first channel): channel c of this group is channel ``offset + c`` there
    batchnorms: list[tuple[str, int]] = field(default_factory=list)
    depthwise: list[tuple[str, int]] = field(default_factory=list)
    #: grouped convs (1 < groups < channels, in == out channels) over the group: channel c of this group is
    #: input *and* output channel ``offset + c`` of the conv, so it is removed from both
    grouped: list[tuple[str, int]] = field(default_factory=list)
    #: (parameter name, dim, first index): per-channel parameters the group's channels are multiplied or
    #: added with (ConvNeXt's layer scale, positional embeddings)
    params: list[tuple[str, int, int]] = field(default_factory=list)
    #: (module name, first input column, columns per channel): channel c of this group is input
    #: columns ``offset + c * repeat ... offset + (c + 1) * repeat - 1`` of that consumer
    consumers: list[tuple[str, int, int]] = field(default_factory=list)
    #: removals must be equal in every run of ``block`` consecutive channels (a grouped conv's groups)
    block: int = 1
    #: why the group cannot be pruned (reaches the output, normalised over channels ...), or None
    locked: Optional[str] = None
    #: ops the channel dimension passes through that the pass cannot follow
    unresolved: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.producers[0]


@dataclass(frozen=True)
class _Ch:
    """Channel layout of a tensor: segments (group id, size) along ``axis``, columns per channel."""

    segs: tuple[tuple[int, int], ...]
    axis: int = 1
    repeat: int = 1

    @property
    def size(self) -> int:
        return sum(s for _, s in self.segs) * self.repeat

    def at(self, axis: int) -> "_Ch":
        return _Ch(self.segs, axis, self.repeat)


@dataclass(frozen=True)
class _Parts:
    """What a ``chunk`` / ``split`` returns: the layout of each part (``getitem`` picks one)."""

    parts: tuple[_Ch, ...]


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


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _block(group: ChannelGroup, block: int) -> int:
    """The run length within which removals must be equal, for two grouped convs over one group: equal
    counts per run of gcd(k1, k2) channels are equal per k1 and per k2 (unresolvable if coprime)."""
    if group.block == 1:
        return block
    common = math.gcd(group.block, block)
    if common == 1:
        group.unresolved.append(f"grouped convs with {group.block} and {block} channels per group")
        return group.block
    return common


class _Analysis:
    def __init__(self, model: nn.Module, example_input: Any):
        self.model = model
        self.modules = dict(model.named_modules())
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - report what fx says, with the fix
            raise CouplingError(
                f"cannot trace the model with torch.fx to find coupled channels ({type(exc).__name__}: {exc}"
                f"{ops.where(exc)}). Make forward() traceable (no data-dependent control flow), or prune with "
                "granularity 'kernel' only (feature_map_ratio=0)") from exc
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

    def placeholder(self, channels: int, why: str) -> int:
        """A group with no producer, locked: channels the pass knows the size of but must not prune (a part
        of a split, an untracked tensor concatenated with tracked ones). Whatever it is unioned with is
        locked too; on its own it is dropped from the result."""
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup([], channels, locked=why))
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

    def lock(self, ch: _Ch, why: str) -> None:
        for g, _ in ch.segs:
            self.groups[g].locked = self.groups[g].locked or why

    def consume(self, module: str, ch: _Ch) -> None:
        offset = 0
        for g, size in ch.segs:
            self.groups[g].consumers.append((module, offset * ch.repeat, ch.repeat))
            offset += size

    def per_channel(self, module: str, ch: _Ch, kind: str, block: int = 1) -> None:
        """A per-channel module (BatchNorm, depthwise / grouped conv) over the tensor's channels."""
        if block > 1 and len(ch.segs) > 1:  # equal removals per conv group across several groups: not followed
            self.problem(ch, f"call_module {module} (grouped conv over the channels of several producers)")
            return
        offset = 0
        for g, size in ch.segs:
            getattr(self.groups[g], kind).append((module, offset))
            if block > 1:
                self.groups[g].block = _block(self.groups[g], block)
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

    def step(self, node: fx.Node, tracked: list[_Ch]) -> "Optional[_Ch | _Parts]":
        if any(isinstance(t, _Parts) for t in tracked):
            return self.pick(node, tracked)
        if node.op == "call_module":
            return self.module(node, self.modules[node.target], tracked)
        if node.op in ("call_function", "call_method"):
            return self.function(node, tracked) if tracked else None
        if node.op == "output":
            for ch in tracked:
                self.lock(ch, "reaches the model output")
        return None

    def module(self, node: fx.Node, mod: nn.Module, tracked: list[_Ch]) -> Optional[_Ch]:
        ch = tracked[0] if tracked else None
        if isinstance(mod, nn.Conv2d):
            return self.conv(node, mod, ch)
        if isinstance(mod, nn.Linear):
            return self.linear(node, mod, ch)
        if ch is None:
            return None
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            if ch.axis != 1 or ch.repeat != 1:
                self.problem(ch, self.describe(node) + " over a non-channel axis")
                return None
            self.per_channel(node.target, ch, "batchnorms")
            return ch
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)):
            return self.norm(node, ch, len(mod.normalized_shape) if isinstance(mod, nn.LayerNorm) else None)
        if isinstance(mod, ops.SAME_MODULES):
            return ch
        if isinstance(mod, nn.Softmax):
            return self.softmax(node, ch, mod.dim)
        if isinstance(mod, nn.Flatten):
            return self.reshape(node, ch)
        self.problem(ch, self.describe(node))
        return None

    def function(self, node: fx.Node, tracked: list[_Ch]) -> Optional[_Ch]:
        t, ch = node.target, tracked[0]
        name = t if isinstance(t, str) else getattr(t, "__name__", "")
        if t in ops.SAME_FUNCTIONS or t in ops.SAME_METHODS or (not isinstance(t, str) and name in ops.SAME_NAMES):
            return ch
        if not isinstance(t, str) and name in ops.LOCK_NAMES:
            self.lock(ch, f"{ops.LOCK_NAMES[name]}, taken by {self.describe(node)}")
            return None
        if t in ops.ELEMENTWISE:
            return self.elementwise(node, tracked)
        if t in (torch.cat, torch.concat):
            return self.cat(node, tracked)
        if t in ops.RESHAPES:
            return self.reshape(node, ch)
        if t in ops.SPLITS:
            return self.split(node, ch)
        if t in ops.PERMUTES:
            return self.permute(node, ch)
        if t in ops.REDUCE:
            return self.reduce(node, ch)
        if t in (F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax"):
            return self.softmax(node, ch, _arg(node, 1, "dim"))
        if t is F.layer_norm:
            return self.norm(node, ch, len(_arg(node, 1, "normalized_shape")))
        if t in (F.pad, torch.roll, "roll", "expand", "expand_as") or t is operator.getitem:
            return self.same_channels(node, ch)
        if t in ("size", "dim", "numel") or t is getattr:
            return None  # shapes and sizes carry no channels
        self.problem(ch, self.describe(node))
        return None

    # ------------------------------------------------------------------ layers
    def conv(self, node: fx.Node, mod: nn.Conv2d, ch: Optional[_Ch]) -> Optional[_Ch]:
        if ch is not None and (ch.axis != 1 or ch.repeat != 1):
            self.problem(ch, self.describe(node) + " applied to a flattened or channels-last tensor")
            ch = None
        if mod.groups == 1:
            if ch is not None:
                self.consume(node.target, ch)
            return _Ch(((self.new_group(node.target, mod.out_channels), mod.out_channels),))
        if mod.in_channels == mod.out_channels and ch is not None:
            # depthwise (one channel per group) or grouped (k per group): channel c in is channel c out
            per_group = mod.in_channels // mod.groups
            if per_group == 1:
                self.per_channel(node.target, ch, "depthwise")
            else:
                self.per_channel(node.target, ch, "grouped", block=per_group)
            return ch
        if ch is not None:
            self.problem(ch, self.describe(node) + f" (grouped conv, groups={mod.groups}, "
                                                   f"{mod.in_channels} -> {mod.out_channels} channels)")
        # its own output channels are tied to its input channels (depthwise / grouped on an untracked input,
        # e.g. the model input or a tensor after an op the pass cannot follow): never prune them
        g = self.new_group(node.target, mod.out_channels)
        self.groups[g].locked = f"grouped conv (groups={mod.groups}) over channels the pass does not track"
        return _Ch(((g, mod.out_channels),))

    def linear(self, node: fx.Node, mod: nn.Linear, ch: Optional[_Ch]) -> Optional[_Ch]:
        shape, out = _shape(node.args[0]), _shape(node)
        if ch is not None:
            if shape is not None and ch.axis == len(shape) - 1:
                self.consume(node.target, ch)
            else:
                self.problem(ch, self.describe(node) + " applied to a non-flattened feature map")
        if out is None:
            return None
        return _Ch(((self.new_group(node.target, mod.out_features), mod.out_features),), len(out) - 1)

    def norm(self, node: fx.Node, ch: _Ch, last_dims: Optional[int]) -> _Ch:
        """LayerNorm over the last ``last_dims`` axes (GroupNorm: None, over channel groups)."""
        rank = len(_shape(node) or ())
        if last_dims is None or ch.axis >= rank - last_dims:
            self.lock(ch, f"normalised over its channels by {self.describe(node)} (removing channels would "
                          "change the statistics)")
        return ch

    def softmax(self, node: fx.Node, ch: _Ch, dim: Any) -> Optional[_Ch]:
        rank = len(_shape(node) or ())
        if isinstance(dim, int) and dim % max(rank, 1) != ch.axis:
            return ch
        self.problem(ch, self.describe(node) + " across channels")
        return None

    # ------------------------------------------------------------------ shape ops
    def same_channels(self, node: fx.Node, ch: _Ch) -> Optional[_Ch]:
        """Ops that keep every axis (pad, roll, expand, indexing) are fine while the channel axis keeps its
        size and position; ``roll`` must not shift along it."""
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if node.target in (torch.roll, "roll"):
            dims = _arg(node, 2, "dims")
            dims = [dims] if isinstance(dims, int) else list(dims or [])
            if not dims or any(d % len(in_shape) == ch.axis for d in dims):
                self.problem(ch, self.describe(node) + " along the channel axis")
                return None
        if node.target is operator.getitem:
            return self.getitem(node, ch)
        if in_shape and out_shape and len(in_shape) == len(out_shape) and in_shape[ch.axis] == out_shape[ch.axis]:
            return ch
        self.problem(ch, self.describe(node) + " changing the channel axis")
        return None

    def getitem(self, node: fx.Node, ch: _Ch) -> Optional[_Ch]:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if in_shape is None or out_shape is None:
            return None if in_shape is None else self._lost(node, ch)
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(i is Ellipsis or i is None or isinstance(i, fx.Node) for i in index):
            return self._lost(node, ch)
        if ch.axis < len(index) and index[ch.axis] != slice(None):
            return self._lost(node, ch)
        removed = sum(1 for i in index[: ch.axis] if isinstance(i, int))
        axis = ch.axis - removed
        if axis < len(out_shape) and out_shape[axis] == in_shape[ch.axis]:
            return ch.at(axis)
        return self._lost(node, ch)

    def _lost(self, node: fx.Node, ch: _Ch) -> None:
        self.problem(ch, self.describe(node) + " indexing the channel axis")
        return None

    def elementwise(self, node: fx.Node, tracked: list[_Ch]) -> Optional[_Ch]:
        """Operands meeting in an add / mul: their channel c is one channel. Untracked operands must not
        vary along the channel axis, unless they are a parameter (sliced with the group)."""
        out = _shape(node)
        if out is None:
            return None
        first = tracked[0]
        ranks = {n: len(_shape(n) or ()) for n in _nodes_in(node.args)}
        tail = None
        for n in _nodes_in(node.args):
            if n in self.info:
                ch = self.info[n]
                t = ranks[n] - ch.axis
                if tail is None:
                    tail = t
                elif t != tail or [s for _, s in ch.segs] != [s for _, s in first.segs] or ch.repeat != first.repeat:
                    self.problem(first, self.describe(node) + " between differently laid-out channels")
                    self.problem(ch, self.describe(node) + " between differently laid-out channels")
                    continue
                for (a, _), (b, _) in zip(first.segs, ch.segs):
                    self.union(a, b)
        for n in _nodes_in(node.args):
            shape = _shape(n)
            if n in self.info or shape is None or len(shape) < tail or shape[len(shape) - tail] == 1:
                continue
            if n.op == "get_attr":
                self.per_param(n.target, len(shape) - tail, first)
            else:
                self.problem(first, self.describe(node) + f" with an untracked operand {n.name} over the channels")
        return first.at(len(out) - tail)

    def per_param(self, name: str, dim: int, ch: _Ch) -> None:
        offset = 0
        for g, size in ch.segs:
            self.groups[g].params.append((name, dim, offset))
            offset += size

    def split(self, node: fx.Node, ch: _Ch) -> Optional[_Parts]:
        """chunk / split: along another axis every part carries the channels; along the channel axis the
        input's groups are locked (the parts would need equal, aligned removals: ShuffleNetV2's halves, an
        attention's q / k / v) and each part becomes a locked placeholder of its size."""
        shape = _shape(node.args[0])
        if shape is None:
            self.problem(ch, self.describe(node))
            return None
        dim = _arg(node, 2, "dim", 0) % len(shape)
        chunk = node.target in (torch.chunk, "chunk")
        how = _arg(node, 1, "chunks" if chunk else "split_size")
        index = torch.arange(shape[dim])  # the parts' sizes as torch itself splits
        sizes = [len(p) for p in (index.chunk(how) if chunk else index.split(how))]
        if dim != ch.axis:
            return _Parts((ch,) * len(sizes))
        if ch.repeat != 1:
            self.problem(ch, self.describe(node) + " of a flattened tensor")
            return None
        why = (f"split along its channels by {self.describe(node)}: the parts would need equal, aligned removals "
               "(ShuffleNetV2's halves, an attention's q / k / v), which slicing does not follow")
        self.lock(ch, why)
        return _Parts(tuple(_Ch(((self.placeholder(n, why), n),), dim) for n in sizes))

    def pick(self, node: fx.Node, tracked: list) -> Optional[_Ch]:
        """``parts[i]`` of a split; any other use of the tuple is not followed."""
        parts = next(t for t in tracked if isinstance(t, _Parts))
        if node.target is operator.getitem and isinstance(node.args[1], int):
            return parts.parts[node.args[1]]
        for ch in parts.parts:
            self.problem(ch, self.describe(node) + " of the parts of a split")
        return None

    def cat(self, node: fx.Node, tracked: list[_Ch]) -> Optional[_Ch]:
        dim = _arg(node, 1, "dim", 0)
        shape = _shape(node)
        inputs = _nodes_in(node.args[0] if node.args else node.kwargs.get("tensors", ()))
        first = tracked[0]
        if shape is None:
            self.problem(first, self.describe(node))
            return None
        dim %= len(shape)
        if len(tracked) != len(inputs) and dim == first.axis and all(c.axis == dim for c in tracked):
            return self.cat_untracked(node, inputs, dim)
        if len(tracked) != len(inputs):
            # e.g. ViT's class token joined to the patch tokens: its channels would need slicing too. The
            # group cannot shrink, but stays tracked so later locks (LayerNorm) and unions still reach it
            self.problem(first, self.describe(node) + " with untracked inputs")
            return first if dim != first.axis else None
        if dim == first.axis and all(c.axis == dim and c.repeat == first.repeat for c in tracked):
            segs: tuple = ()
            for c in tracked:
                segs += c.segs
            return _Ch(segs, dim, first.repeat)
        if dim != first.axis:  # concatenated along another axis: the inputs share their channels
            return self.elementwise(node, tracked)
        self.problem(first, self.describe(node) + f" along dim {dim}")
        return None

    def cat_untracked(self, node: fx.Node, inputs: list[fx.Node], dim: int) -> Optional[_Ch]:
        """Concatenated along the channels with tensors the pass does not track (no tracked producer made
        them): their channels stay as they are (a locked placeholder each), the tracked ones keep their
        columns at their offsets."""
        known = [self.info[n] for n in inputs if n in self.info]
        sizes = [_shape(n) for n in inputs]
        if any(c.repeat != 1 for c in known) or any(s is None or len(s) <= dim for s in sizes):
            for c in known:
                self.problem(c, self.describe(node) + " with untracked inputs")
            return None
        why = f"concatenated by {self.describe(node)} with channels the pass does not track"
        segs: tuple = ()
        for n, shape in zip(inputs, sizes):
            segs += self.info[n].segs if n in self.info else ((self.placeholder(shape[dim], why), shape[dim]),)
        return _Ch(segs, dim)

    def reshape(self, node: fx.Node, ch: _Ch) -> Optional[_Ch]:
        """view / reshape / flatten: the channel axis survives if the axes before it keep their product and
        it is either kept or merged with the axes after it (then each channel spans ``repeat`` columns)."""
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if in_shape is None or out_shape is None:
            self.problem(ch, self.describe(node))
            return None
        before = math.prod(in_shape[: ch.axis])
        size = in_shape[ch.axis]
        for b in range(len(out_shape)):
            if math.prod(out_shape[:b]) != before:
                continue
            if out_shape[b] == size:
                return ch.at(b)
            merged = out_shape[b] // size if size else 0
            if merged and out_shape[b] == size * merged and math.prod(in_shape[ch.axis + 1:]) % merged == 0 \
                    and self._merges(in_shape, ch.axis, merged):
                return _Ch(ch.segs, b, ch.repeat * merged)
            if ch.repeat == 1 and self._splits(out_shape[b:], size):
                self.lock(ch, f"divided into parts by {self.describe(node)} ({list(in_shape)} -> {list(out_shape)}: "
                              "a channel shuffle or attention heads): removals would have to keep every part "
                              "equal and aligned, which slicing does not follow")
                return None
        self.problem(ch, self.describe(node) + f" reshaping {list(in_shape)} to {list(out_shape)}")
        return None

    @staticmethod
    def _splits(after: tuple, size: int) -> bool:
        """The leading axes of ``after`` (two or more, each > 1) multiply to ``size``: the channel axis is
        divided into them."""
        p = 1
        for i, s in enumerate(after):
            p *= s
            if p == size:
                return i >= 1 and after[0] > 1
            if p > size:
                return False
        return False

    @staticmethod
    def _merges(in_shape: tuple, axis: int, merged: int) -> bool:
        """``merged`` is the product of the axes right after ``axis`` (a flatten of them into it)."""
        p = 1
        for s in in_shape[axis + 1:]:
            p *= s
            if p == merged:
                return True
        return merged == 1

    def permute(self, node: fx.Node, ch: _Ch) -> Optional[_Ch]:
        rank = len(_shape(node) or ())
        if ch.repeat != 1 or not rank:
            self.problem(ch, self.describe(node) + " of a flattened tensor")
            return None
        if node.target in (torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
            a, b = _arg(node, 1, "dim0") % rank, _arg(node, 2, "dim1") % rank
            order = list(range(rank))
            order[a], order[b] = b, a
        else:
            dims = node.args[1:] if node.target == "permute" else (_arg(node, 1, "dims"),)
            order = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
            order = [d % rank for d in order]
        return ch.at(order.index(ch.axis))

    def reduce(self, node: fx.Node, ch: _Ch) -> Optional[_Ch]:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        dims = _arg(node, 1, "dim")
        if in_shape is None or out_shape is None or dims is None or ch.repeat != 1:
            self.problem(ch, self.describe(node) + " over all axes")
            return None
        dims = {d % len(in_shape) for d in ([dims] if isinstance(dims, int) else dims)}
        if ch.axis in dims:
            self.problem(ch, self.describe(node) + " across channels")
            return None
        axis = ch.axis if len(out_shape) == len(in_shape) else ch.axis - sum(1 for d in dims if d < ch.axis)
        return ch.at(axis)

    # ------------------------------------------------------------------ result
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
            for kind in ("batchnorms", "depthwise", "grouped", "params", "consumers", "unresolved"):
                getattr(c, kind).extend(getattr(grp, kind))
            if grp.block > 1:
                c.block = _block(c, grp.block)
            c.locked = c.locked or grp.locked
        return [c for c in classes.values() if c.producers]  # placeholders alone are no group


def channel_groups(model: nn.Module, example_input: Any,
                   couple: Optional[Iterable[Iterable[str]]] = None) -> list[ChannelGroup]:
    """Groups of coupled output channels of ``model``'s convs and Linear layers (see the module docstring).

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
    ids = {g.producers[0]: i for i, g in enumerate(analysis.groups) if g.producers}
    for names in couple or ():
        names = [n for n in names if n in ids]
        for n in names[1:]:
            analysis.union(ids[names[0]], ids[n])
    return analysis.merge()
