"""Saving a pruned model whole, and loading it back.

``save_model(path, model, masks)`` writes the pruned weights (the model's ``state_dict``, buffers
included: BatchNorm statistics re-estimated after channel pruning matter) together with the
masks, in a file ``torch.load(..., weights_only=True)`` reads safely. ``load(path, model)``
returns ``model`` holding exactly those weights: its outputs equal the pruned model's bit for bit.
A masks-only file (``masks_only=True``, the format of earlier versions) re-applies the masks to
whatever weights ``model`` has, which is only right for the dense model the masks came from; it
says so in a warning.
"""
from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any, Optional

import torch
from torch import nn

from .targets import apply_masks

log = logging.getLogger("de_plugin")
MODEL_FORMAT = "de_plugin.pruned/2"
MASKS_FORMAT = "de_plugin.masks/1"


def save_model(path: str | os.PathLike, model: nn.Module, masks: Optional[dict[str, torch.Tensor]] = None,
               summary: Optional[dict[str, Any]] = None, masks_only: bool = False) -> None:
    """Write the pruned ``model`` (or, with ``masks_only``, its masks) atomically to ``path``.

    ``masks`` map parameter names to bool masks; without them the zeros of every weight matrix are
    taken as its mask. Works for any pruned model: the core's result, an NNI model after
    ``unwrap_model()``, an INC model after its loop.
    """
    if masks is None:
        masks = {n: p.detach() != 0 for n, p in model.named_parameters() if p.dim() > 1}
    payload: dict[str, Any] = {"format": MASKS_FORMAT if masks_only else MODEL_FORMAT,
                               "masks": {k: v.detach().cpu().bool() for k, v in masks.items()},
                               "summary": summary or {}}
    if not masks_only:
        payload["state_dict"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the file from its readers
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no masks file at {path} (write one with PruningResult.save)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - random bytes, truncated zip, wrong format
        raise ValueError(f"masks file {path} is corrupt or truncated ({type(exc).__name__}); write it again with "
                         f"PruningResult.save (the model was not touched)") from None
    if not isinstance(payload, dict) or payload.get("format") not in (MODEL_FORMAT, MASKS_FORMAT):
        raise ValueError(f"{path} is not a de_plugin file (written by PruningResult.save or de_plugin.save_model)")
    return payload


def _mismatches(model: nn.Module, payload: dict[str, Any]) -> list[str]:
    problems = []
    params = dict(model.named_parameters())
    for name, m in payload["masks"].items():
        if name not in params:
            problems.append(f"{name}: no such parameter in the model")
        elif tuple(params[name].shape) != tuple(m.shape):
            problems.append(f"{name}: mask shape {tuple(m.shape)} != parameter shape {tuple(params[name].shape)}")
    state = payload.get("state_dict")
    if state is not None:
        own = model.state_dict()
        for name in sorted(set(own) ^ set(state)):
            problems.append(f"{name}: {'missing from the file' if name in own else 'not in the model'}")
        problems += [f"{n}: saved shape {tuple(t.shape)} != model shape {tuple(own[n].shape)}"
                     for n, t in state.items() if n in own and tuple(t.shape) != tuple(own[n].shape)]
    return problems


def load(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a pruned model saved by ``PruningResult.save`` / :func:`save_model` into ``model`` (same
    architecture) and return it. Every name and shape is checked before anything is written, so a
    mismatch leaves the model as it was."""
    path = os.fspath(path)
    payload = _read(path)
    problems = _mismatches(model, payload)
    if problems:
        raise ValueError(f"the masks and weights in {path} do not fit this model: " + "; ".join(problems[:10])
                         + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))
    with torch.no_grad():
        if "state_dict" in payload:
            model.load_state_dict(payload["state_dict"])
            return model
        warnings.warn(f"{path} holds masks only: they are applied to the weights this model has, which gives the "
                      "pruned model only if these are the dense weights the masks came from (save with "
                      "PruningResult.save() to keep the pruned weights)", stacklevel=2)
        apply_masks(model, payload["masks"])
    return model


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs: Any, opset: int = 17) -> dict[str, Any]:
    """Export ``model`` (eval mode, the pruned weights as they are) to ONNX at ``path``.

    Pruned weights are exported as zeros of the dense tensors: the file shrinks only after
    compression (zip) or, for channel masks, after NNI's ``ModelSpeedup``. Returns the path and size.
    """
    try:
        import onnx  # noqa: F401 - torch's exporter writes through it
    except ImportError:
        raise ImportError("export_onnx needs onnx: pip install 'de-plugin[onnx]' (onnx, onnxruntime)") from None
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    path = os.fspath(path)
    was = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter
            torch.onnx.export(model, args, path, opset_version=opset, dynamo=False,
                              input_names=[f"input{i}" for i in range(len(args))], output_names=["output"],
                              dynamic_axes={**{f"input{i}": {0: "batch"} for i in range(len(args))},
                                            "output": {0: "batch"}})
    finally:
        model.train(was)
    size = os.path.getsize(path)
    log.info("exported %s (%.1f KiB)", path, size / 1024)
    return {"path": path, "bytes": size}
