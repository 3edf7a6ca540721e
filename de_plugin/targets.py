"""Which parameters are pruned, and how masks stay applied while a user's loop trains.

Masks are held by ``torch.nn.utils.prune`` containers (a ``<name>_orig`` parameter, a
``<name>_mask`` buffer and a forward pre-hook), so any training loop sees masked weights and
recurrent layers (LSTM/GRU flat weights) keep working. We subclass its pruning method only to
add a straight-through gradient, which Dynamic Network Surgery's splicing needs: pruned weights
keep receiving gradients so they can grow back.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

#: module types whose weights are pruned by default, with the parameter names that count.
DEFAULT_TYPES: dict[type, Callable[[nn.Module], list[str]]] = {
    nn.Linear: lambda m: ["weight"],
    nn.Conv1d: lambda m: ["weight"],
    nn.Conv2d: lambda m: ["weight"],
    nn.Conv3d: lambda m: ["weight"],
    nn.ConvTranspose2d: lambda m: ["weight"],
    nn.LSTM: lambda m: [n for n, _ in m.named_parameters(recurse=False) if n.startswith("weight_")],
    nn.GRU: lambda m: [n for n, _ in m.named_parameters(recurse=False) if n.startswith("weight_")],
    nn.RNN: lambda m: [n for n, _ in m.named_parameters(recurse=False) if n.startswith("weight_")],
    # attention projections: the packed q/k/v weight (or the three separate ones); out_proj is a Linear
    nn.MultiheadAttention: lambda m: [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
                                      if isinstance(getattr(m, n, None), nn.Parameter)],
}


def layer_kind(module: nn.Module) -> type | None:
    """The supported type a module is, subclasses included (e.g. MultiheadAttention's out_proj, a
    ``NonDynamicallyQuantizableLinear``, counts as Linear); None when it is not prunable."""
    return next((t for t in DEFAULT_TYPES if isinstance(module, t)), None)


@dataclass(frozen=True)
class Target:
    """One prunable weight tensor: ``module_name.param_name``."""

    module_name: str
    param_name: str
    module_type: str
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or name == p for p in patterns)


def find_targets(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    layer_types: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[Target]:
    """Prunable weights of ``model``.

    ``layers``: module names or fnmatch patterns to include (default: every supported module);
    ``layer_types``: class names such as ``"Linear"``; ``exclude``: names/patterns to skip (e.g.
    the classifier). A pattern that matches nothing is an error, so a typo never silently prunes
    the wrong layers.
    """
    type_names = {t.__name__: t for t in DEFAULT_TYPES}
    if layer_types is not None:
        unknown = [t for t in layer_types if t not in type_names]
        if unknown:
            raise ValueError(f"unknown layer_types {unknown}; supported: {sorted(type_names)}")
    modules = dict(model.named_modules())
    for label, pats in (("layers", layers), ("exclude", exclude)):
        for p in pats or ():
            if not any(_matches(n, [p]) for n in modules if n):
                raise ValueError(
                    f"{label} pattern {p!r} matches no module of the model; module names are e.g. "
                    f"{[n for n in modules if n][:8]}"
                )
    out: list[Target] = []
    for name, mod in modules.items():
        kind = layer_kind(mod)
        if kind is None:
            continue
        if layer_types is not None and kind.__name__ not in layer_types:
            continue
        if layers is not None and not _matches(name, layers):
            continue
        if exclude and _matches(name, exclude):
            continue
        for pname in DEFAULT_TYPES[kind](mod):
            p = getattr(mod, pname)
            out.append(Target(name, pname, kind.__name__, tuple(p.shape)))
    if not out:
        raise ValueError(
            "no prunable layer found: the model has no Conv/Linear/LSTM/GRU weight matching the "
            "selection (check `layers`, `layer_types` and `exclude`)"
        )
    return out


def get_param(model: nn.Module, t: Target) -> torch.Tensor:
    """The live weight tensor of a target (the ``_orig`` parameter while a mask is attached)."""
    mod = model.get_submodule(t.module_name)
    orig = getattr(mod, t.param_name + "_orig", None)
    return orig if isinstance(orig, nn.Parameter) else getattr(mod, t.param_name)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Zero the masked entries of ``model``'s tensors in place: the one place masks meet weights.

    ``masks`` maps a tensor's dotted name (``"features.0.weight"``) to a 0/1 or bool tensor of its shape;
    while a mask container is attached the live ``<name>_orig`` is masked (as :func:`get_param` reads it).
    ``strict=False`` skips names the model lacks and shapes that differ (masks of a model before a
    speedup changed it); otherwise those raise ``KeyError`` / ``ValueError``.
    """
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, m in masks.items():
            mod_name, _, pname = name.rpartition(".")
            mod = modules.get(mod_name)
            orig = getattr(mod, pname + "_orig", None) if mod is not None else None
            t = orig if isinstance(orig, nn.Parameter) else getattr(mod, pname, None)
            if not isinstance(t, torch.Tensor) or t.shape != m.shape:
                if not strict:
                    continue
                if not isinstance(t, torch.Tensor):
                    raise KeyError(f"the model has no tensor {name!r} to apply a mask to")
                raise ValueError(f"mask of {name!r} has shape {tuple(m.shape)}, the tensor {tuple(t.shape)}")
            t.mul_(m.to(t.device, t.dtype))


def layer_sparsity(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: 1.0 - float(m.sum()) / m.numel() for k, m in masks.items()}


class MaskMethod(torch_prune.BasePruningMethod):
    """``torch.nn.utils.prune`` method holding a given mask, optionally straight-through.

    ``straight_through=True`` computes ``w - (w * (1 - mask)).detach()``: the forward value is
    ``w * mask`` while the gradient reaches every entry of ``w`` (Dynamic Network Surgery).
    ``on_forward`` is called in train mode before each forward, which is where splicing updates
    the mask from inside any user training loop.
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, mask: torch.Tensor, straight_through: bool = False, on_forward=None):
        self.mask = mask
        self.straight_through = straight_through
        self.on_forward = on_forward

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return self.mask.to(dtype=default_mask.dtype, device=default_mask.device)

    def apply_mask(self, module: nn.Module) -> torch.Tensor:
        orig = getattr(module, self._tensor_name + "_orig")
        mask = getattr(module, self._tensor_name + "_mask")
        if self.straight_through:
            return orig - (orig * (1 - mask)).detach()
        return orig * mask

    def __call__(self, module: nn.Module, inputs) -> None:
        if self.on_forward is not None and module.training and torch.is_grad_enabled():
            self.on_forward(module, self._tensor_name)
        super().__call__(module, inputs)


class ChildMaskHook:
    """Recompute a child's masked weight before its *parent's* forward: ``nn.MultiheadAttention``
    reads ``out_proj.weight`` inside its own forward without calling ``out_proj``, so the child's
    own pre-hook never fires and training would reuse one stale masked tensor (torch 2.13:
    "Trying to backward through the graph a second time" on the second step)."""

    def __init__(self, child: nn.Module, method: MaskMethod):
        self.child, self.method = child, method

    def __call__(self, module: nn.Module, inputs) -> None:
        self.method(self.child, inputs)


def _attention_parent(model: nn.Module, module_name: str) -> Optional[nn.Module]:
    if "." not in module_name:
        return None
    parent = model.get_submodule(module_name.rsplit(".", 1)[0])
    return parent if isinstance(parent, nn.MultiheadAttention) else None


def attach_masks(
    model: nn.Module,
    targets: Sequence[Target],
    masks: dict[str, torch.Tensor],
    straight_through: bool = False,
    on_forward=None,
) -> None:
    """Attach masks so every forward uses masked weights (the model stays trainable)."""
    for t in targets:
        mod = model.get_submodule(t.module_name)
        method = MaskMethod(masks[t.name], straight_through, on_forward)
        method._tensor_name = t.param_name
        # ``apply`` would build a fresh method from kwargs; register ours so options survive.
        orig = getattr(mod, t.param_name)
        del mod._parameters[t.param_name]
        mod.register_parameter(t.param_name + "_orig", orig)
        mod.register_buffer(t.param_name + "_mask", masks[t.name].to(orig.dtype).to(orig.device).clone())
        setattr(mod, t.param_name, method.apply_mask(mod))
        mod.register_forward_pre_hook(method)
        parent = _attention_parent(model, t.module_name)
        if parent is not None:
            parent.register_forward_pre_hook(ChildMaskHook(mod, method))
        if isinstance(mod, nn.RNNBase):
            mod._init_flat_weights()


def detach_masks(model: nn.Module, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
    """Bake ``orig * mask`` into a plain parameter, remove the hooks; return the final masks."""
    out: dict[str, torch.Tensor] = {}
    for t in targets:
        mod = model.get_submodule(t.module_name)
        mask = getattr(mod, t.param_name + "_mask").detach().bool().clone()
        orig = getattr(mod, t.param_name + "_orig")
        for k, hook in list(mod._forward_pre_hooks.items()):
            if isinstance(hook, MaskMethod) and hook._tensor_name == t.param_name:
                del mod._forward_pre_hooks[k]
        parent = _attention_parent(model, t.module_name)
        if parent is not None:
            for k, hook in list(parent._forward_pre_hooks.items()):
                if isinstance(hook, ChildMaskHook) and hook.child is mod and hook.method._tensor_name == t.param_name:
                    del parent._forward_pre_hooks[k]
        delattr(mod, t.param_name)
        del mod._parameters[t.param_name + "_orig"]
        del mod._buffers[t.param_name + "_mask"]
        with torch.no_grad():
            orig.mul_(mask.to(orig.dtype))
        mod.register_parameter(t.param_name, orig)
        if isinstance(mod, nn.RNNBase):
            mod._init_flat_weights()
        out[t.name] = mask
    return out


@contextmanager
def masks_attached(model, targets, masks, straight_through=False, on_forward=None) -> Iterator[None]:
    """Masks held during the block (e.g. a user's fine-tune); baked and removed afterwards."""
    attach_masks(model, targets, masks, straight_through, on_forward)
    try:
        yield
    finally:
        final = detach_masks(model, targets)
        for k, m in final.items():
            masks[k] = m

