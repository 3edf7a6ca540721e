"""Prune with ``de_layerwise``, then quantize with INC 3.8+ in one call, zeros guaranteed.

``prune_and_quantize(model, pruning=DELayerwiseConfig(...), quant=StaticQuantConfig(), example_inputs=(x,),
calib_data=batches)`` prunes a copy of the model (the user's stays as it was), then runs INC's own path:
``export`` -> ``prepare`` -> calibrate -> ``convert`` for static and dynamic int8 (PT2E), ``quantize`` for
RTN weight-only int8/int4. Afterwards every pruned weight must be the zero point of its quantized
integer (checked, not assumed: :func:`zeros_kept`); GPTQ is refused because it refills pruned weights.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
from neural_compressor.torch.export import export
from neural_compressor.torch.quantization import (
    DynamicQuantConfig,
    GPTQConfig,
    INT8StaticQuantConfig,
    RTNConfig,
    convert,
    prepare,
    quantize,
)
from torch import nn

from de_plugin.adapter import check_batches, check_score

from .channels3 import DEChannelConfig, prune_channels
from .inc3 import DELayerwiseConfig, prune_model

log = logging.getLogger("de_plugin_inc")
QDQ = ("quantize_per_channel", "quantize_per_tensor")


def check_quant(quant: Any, calib_data: Optional[Iterable], example_inputs: Optional[Tuple]) -> str:
    """The route for ``quant`` ("pt2e" or "rtn"); a clear error for anything this cannot keep zeros under."""
    if isinstance(quant, GPTQConfig):
        raise ValueError("GPTQ re-solves each weight column and refills pruned weights (95-98% of the zeros kept "
                         "here): it cannot follow a pruned model. Use RTNConfig (weight-only) or StaticQuantConfig")
    if isinstance(quant, RTNConfig):
        return "rtn"
    if not isinstance(quant, (INT8StaticQuantConfig, DynamicQuantConfig)):
        raise ValueError(f"quant must be StaticQuantConfig(), DynamicQuantConfig() or RTNConfig() (the INC 3.x "
                         f"methods verified to keep pruned weights at zero), got {type(quant).__name__}")
    if not isinstance(example_inputs, tuple):
        raise ValueError("INC's PT2E quantization exports the model first: give example_inputs as a tuple of "
                         f"inputs, e.g. (torch.randn(1, 3, 32, 32),); got {type(example_inputs).__name__}")
    if isinstance(quant, INT8StaticQuantConfig) and calib_data is None:
        raise ValueError("static quantization calibrates activation ranges: give calib_data, a few batches of "
                         "inputs (tensors, or (inputs, labels) pairs)")
    return "pt2e"


def prune_and_quantize(model: nn.Module, pruning: "DELayerwiseConfig | DEChannelConfig", quant: Any,
                       example_inputs: Optional[Tuple] = None, calib_data: Optional[Iterable] = None,
                       inplace: bool = False, dynamic_shapes: Any = "batch") -> nn.Module:
    """``de_layerwise`` then INC quantization; the quantized model, with ``.de_plugin_masks`` and
    ``.de_plugin_report`` (per-layer sparsity, zeros kept after quantization, ``eval_fn`` of the dense,
    pruned and quantized model).

    ``dynamic_shapes="batch"`` exports with a free batch dimension (torch.export otherwise fixes every
    size to ``example_inputs``'); pass None for static shapes or torch.export's own specification."""
    if not isinstance(pruning, (DELayerwiseConfig, DEChannelConfig)):
        raise TypeError(f"pruning must be a de_plugin_inc.DELayerwiseConfig or DEChannelConfig, got "
                        f"{type(pruning).__name__}")
    route = check_quant(quant, calib_data, example_inputs)
    batches = None if calib_data is None else check_batches(calib_data, "calib_data", pairs=False)
    if dynamic_shapes == "batch":
        dynamic_shapes = tuple({0: torch.export.Dim.AUTO} if torch.is_tensor(x) else None for x in example_inputs or ())
    pruning.check(model)  # before any work
    work = model if inplace else copy.deepcopy(model)
    work.eval()
    try_quant(work, quant, route, example_inputs, (batches or [])[:1], dynamic_shapes)  # INC's verdict, before work
    dense = check_score(pruning.eval_fn(work))
    if isinstance(pruning, DEChannelConfig):  # channels removed: nothing left at zero to check
        masks = {}
        prune_channels(work, pruning)
    else:
        masks = prune_model(work, pruning)
    report = dict(work.de_plugin_report)
    work.eval()
    report["eval"] = {"dense": dense, "pruned": check_score(pruning.eval_fn(work))}
    q = run_quant(work, quant, route, example_inputs, batches or [], dynamic_shapes, inplace=True)
    kept = zeros_kept(q, masks)
    bad = {n: f for n, f in kept.items() if f < 1.0}
    if bad:
        raise RuntimeError(f"INC's quantization moved pruned weights off zero in {bad}: please report this")
    report["zeros_kept"] = kept
    report["eval"]["quantized"] = check_score(pruning.eval_fn(q))
    q.de_plugin_masks, q.de_plugin_report = masks, report
    return q


def run_quant(model: nn.Module, quant: Any, route: str, example_inputs, batches: list, dynamic_shapes,
              inplace: bool) -> nn.Module:
    """INC's own path: ``quantize`` (RTN), or export -> prepare -> calibrate on ``batches`` -> convert."""
    if route == "rtn":
        return quantize(model, quant, inplace=inplace)
    q = prepare(export(model, example_inputs, dynamic_shapes=dynamic_shapes), quant)
    with torch.no_grad():
        for b in batches:
            q(*_inputs(b, len(example_inputs)))
    q = convert(q)
    # Quirk (INC 3.10 + torchao 0.18): a converted PT2E model raises NotImplementedError on .eval() / .train(),
    # which every evaluation function calls; torchao's own switch makes them legal (eval mode is what runs)
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(q)
    return q


def try_quant(model: nn.Module, quant: Any, route: str, example_inputs, batches: list, dynamic_shapes) -> None:
    """Quantize the dense model once (on one calibration batch) before the search: a config INC rejects
    fails here, in plain words, instead of after the search. Quirk (INC 3.10): INC checks no setting up
    front; an unknown value surfaces deep in ``prepare`` / ``quantize`` as a bare ``KeyError: 'int3'``."""
    try:
        run_quant(model, copy.deepcopy(quant), route, example_inputs, batches, dynamic_shapes, inplace=False)
    except Exception as exc:  # noqa: BLE001 - INC raises whatever its internals raise
        defaults = type(quant)()
        given = {k: getattr(quant, k) for k in quant.params_list if k != "white_list" and hasattr(quant, k)
                 and getattr(defaults, k, None) != getattr(quant, k)}
        what = (f"the value {exc.args[0]!r} is not one INC knows" if isinstance(exc, KeyError) and exc.args
                else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        raise ValueError(f"INC rejected {type(quant).__name__} while quantizing the dense model ({what}); settings "
                         f"other than INC's defaults: {given}. Fix the quantization config; nothing was pruned") from exc


def _inputs(batch: Any, n: int) -> tuple:
    """A calibration batch as the model's positional inputs: a tensor, or the first ``n`` items of an
    (inputs..., labels) tuple."""
    if torch.is_tensor(batch):
        return (batch,)
    return tuple(batch[:n])


def int_weights(qmodel: nn.Module) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (integer weight, zero point broadcastable to it)}`` of a quantized model: the PT2E
    graph's quantize ops evaluated on their weights, or the unpacked integers of INC's weight-only layers."""
    out = {}
    if isinstance(qmodel, torch.fx.GraphModule):
        for node in qmodel.graph.nodes:
            if node.op != "call_function" or not any(k in str(node.target) for k in QDQ):
                continue
            src = node.args[0]
            if getattr(src, "op", None) != "get_attr" or not src.target.endswith("weight"):
                continue
            args = [_value(qmodel, a) for a in node.args]
            q = node.target(*args)
            zp = args[2]
            if torch.is_tensor(zp) and zp.dim() == 1:  # per channel along ``axis``
                shape = [1] * q.dim()
                shape[args[3]] = -1
                zp = zp.view(shape)
            out[src.target.rsplit(".", 1)[0]] = (q, torch.as_tensor(zp))
        return out
    for name, mod in qmodel.named_modules():
        if hasattr(mod, "recover") and hasattr(mod, "qweight"):  # INCWeightOnlyLinear (RTN)
            w = mod.recover().float()
            out[name] = (w, torch.zeros(()))  # dequantized: the zero point maps to exactly 0
    return out


def _value(gm: nn.Module, arg):
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        v = gm
        for part in arg.target.split("."):
            v = getattr(v, part)
        return v
    return arg


def zeros_kept(qmodel: nn.Module, masks: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Per pruned layer, the share of pruned positions whose quantized integer is the zero point."""
    ints = int_weights(qmodel)
    out = {}
    for name, keep in masks.items():
        if name not in ints:
            continue  # a layer INC left in floating point keeps its exact zeros
        q, zp = ints[name]
        pruned = ~keep.to(torch.bool)
        if q.shape != pruned.shape:  # weight-only layers may store [in, out]
            q = q.t() if q.t().shape == pruned.shape else q.reshape(pruned.shape)
        at_zero = (q == zp.to(q.dtype)) if zp.numel() > 1 else (q == zp.to(q.dtype).item())
        out[name] = float(at_zero[pruned].float().mean()) if pruned.any() else 1.0
    return out


def sparsity_of(qmodel: nn.Module, names: Sequence[str]) -> Dict[str, float]:
    """Share of integer weights at their zero point, per layer (for reports)."""
    ints = int_weights(qmodel)
    return {n: float((ints[n][0] == ints[n][1].to(ints[n][0].dtype)).float().mean()) for n in names if n in ints}
