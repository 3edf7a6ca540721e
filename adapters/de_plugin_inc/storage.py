"""A pruned int8 model that is actually small on disk.

Quirk (INC 3.10, PT2E): the converted graph keeps every weight in fp32 followed by a quantize and a
dequantize op, and INC's ``save`` writes that fp32 program, so neither int8 nor the zeros shrink the
file. :func:`save` lowers each quantized weight to its int8 integers (the quantize op folded away; the
dequantize op reads the integers) and stores those integers sparse: a bitmask of the non-zero-point
positions plus their values. :func:`load` rebuilds the graph; its outputs equal the converted model's.
About 1/8 + (1 - sparsity) bytes per weight, against 4 for fp32.
"""
from __future__ import annotations

import copy
import io
import os
from typing import Any, Dict

import numpy as np
import torch
from torch import fx, nn

FORMAT = "de_plugin.sparse_int8/1"


def _get(gm: nn.Module, target: str):
    v = gm
    for part in target.split("."):
        v = getattr(v, part)
    return v


def lower(qmodel: fx.GraphModule) -> fx.GraphModule:
    """A plain ``GraphModule`` whose quantized weights are int8 tensors (quantize ops folded away)."""
    if not isinstance(qmodel, fx.GraphModule):
        raise TypeError(f"save() takes the GraphModule INC's PT2E convert() returns, got {type(qmodel).__name__}")
    graph = copy.deepcopy(qmodel.graph)
    # Quirk (torch 2.13 export): the graph remembers its tracer class, which cannot re-trace on unpickling
    graph._tracer_cls, graph._tracer_extras = None, {}
    attrs: Dict[str, Any] = {}
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":  # export's input-shape guard: not picklable
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_function" and "quantize_per_channel.default" in str(node.target) \
                and "dequantize" not in str(node.target) and node.args[0].op == "get_attr":
            src = node.args[0]
            args = [_get(qmodel, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else a for a in node.args]
            name = src.target.replace(".", "_") + "_int8"
            attrs[name] = node.target(*args)
            with graph.inserting_before(node):
                new = graph.get_attr(name)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if not src.users:
                graph.erase_node(src)
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in attrs:
            v = _get(qmodel, node.target)
            attrs[node.target] = v.detach().clone() if torch.is_tensor(v) else v
    return fx.GraphModule(attrs, graph)


def save(qmodel: fx.GraphModule, path: str) -> int:
    """Write the quantized model with sparse int8 weights to ``path``; the bytes written."""
    gm = lower(qmodel)
    tensors, sparse = {}, {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = _get(gm, node.target)
            if t.dtype == torch.int8 and node.target.endswith("_int8"):
                nz = t.flatten() != 0
                sparse[node.target] = {"shape": tuple(t.shape), "bits": np.packbits(nz.numpy()).tobytes(),
                                       "values": t.flatten()[nz].numpy().tobytes()}
            else:
                tensors[node.target] = t
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "nodes": [_encode_node(n) for n in gm.graph.nodes], "tensors": tensors,
                "sparse": sparse, "pytree": _encode_codegen(gm.graph)}, buf)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


def load(path: str) -> fx.GraphModule:
    """The model :func:`save` wrote, runnable (a ``GraphModule`` with int8 weights)."""
    blob = torch.load(path, weights_only=False)  # operator names and plain values: load only files you trust
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a de_plugin sparse int8 file (format {FORMAT})")
    attrs = dict(blob["tensors"])
    for name, s in blob["sparse"].items():
        n = int(np.prod(s["shape"]))
        nz = torch.from_numpy(np.unpackbits(np.frombuffer(s["bits"], dtype=np.uint8))[:n].astype(bool))
        t = torch.zeros(n, dtype=torch.int8)
        t[nz] = torch.from_numpy(np.frombuffer(s["values"], dtype=np.int8).copy())
        attrs[name] = t.view(s["shape"])
    graph = fx.Graph()
    env: Dict[str, fx.Node] = {}
    for op, name, target, args, kwargs in blob["nodes"]:
        env[name] = graph.create_node(op, _decode_target(target), _decode(args, env), _decode(kwargs, env), name)
    if blob.get("pytree"):  # exported graphs take and return pytrees (a model's tensor, not a 1-tuple)
        from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
        from torch.utils._pytree import treespec_loads

        args, in_spec, out_spec = blob["pytree"]
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(args, treespec_loads(in_spec) if in_spec else None,
                                                    treespec_loads(out_spec) if out_spec else None))
    return fx.GraphModule(attrs, graph)


def _encode_codegen(graph: fx.Graph):
    info = getattr(graph._codegen, "pytree_info", None)
    if info is None:
        return None
    from torch.utils._pytree import treespec_dumps

    return (list(info.orig_args), treespec_dumps(info.in_spec) if info.in_spec else None,
            treespec_dumps(info.out_spec) if info.out_spec else None)


# Quirk (torch 2.13): neither a converted GraphModule (export's guard module, bound methods) nor its Graph
# (pybind11 records in op overloads) pickles, and unpickling a plain GraphModule re-traces its code, which
# folds every dequantize of a constant weight into a new fp32 constant. So the graph is stored as its nodes:
# op names and plain values only, rebuilt node by node without tracing.
def _encode_node(node: fx.Node) -> tuple:
    return (node.op, node.name, _encode_target(node.target), _encode(node.args), _encode(node.kwargs))


def _encode_target(t: Any) -> tuple:
    if isinstance(t, str):
        return ("str", t)
    if isinstance(t, torch._ops.OpOverload):
        return ("op", t._schema.name, t._overloadname)
    if getattr(t, "__module__", None) in ("_operator", "operator"):
        return ("operator", t.__name__)
    raise TypeError(f"save() cannot store the graph target {t!r}")


def _decode_target(t: tuple) -> Any:
    kind, *rest = t
    if kind == "str":
        return rest[0]
    if kind == "operator":
        import operator

        return getattr(operator, rest[0])
    namespace, name = rest[0].split("::")
    return getattr(getattr(getattr(torch.ops, namespace), name), rest[1])


def _encode(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return ("node", a.name)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, [_encode(x) for x in a])
    if isinstance(a, dict):
        return ("dict", {k: _encode(v) for k, v in a.items()})
    if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return ("torch", str(a))
    if a is None or isinstance(a, (bool, int, float, str)):
        return ("py", a)
    raise TypeError(f"save() cannot store the graph argument {a!r}")


def _decode(a: Any, env: Dict[str, fx.Node]) -> Any:
    kind, v = a
    if kind == "node":
        return env[v]
    if kind in ("list", "tuple", "immutable_list"):
        items = [_decode(x, env) for x in v]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(x, env) for k, x in v.items()}
    if kind == "torch":
        return torch.device(v) if ":" in v or v in ("cpu", "cuda", "meta") else getattr(torch, v.split(".", 1)[1])
    return v
