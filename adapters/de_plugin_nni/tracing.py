"""``ModelSpeedup`` on torch 2.13, without editing NNI's installed files.

Quirks of nni 3.0 with torch >= 2.1 / Python 3.11 (delete this module's patches when NNI fixes them):

1. ``concrete_tracer.py:958`` ``AttributeError: 'NoneType' object has no attribute 'startswith'``:
   torch renamed ``_C._TensorBase`` to ``TensorBase`` and three of its methods
   (``_make_subclass``, ``_make_wrapper_subclass``, ``_dtensor__new__``) have ``__module__ is None``;
   we drop them from the tracer's table of wrapped functions.
2. ``Node.is_impure`` gained an argument in torch 2.x; NNI's replacement accepts only ``node``.
3. Python 3.11 inline caches: NNI's proxy finds "the current bytecode instruction" as
   ``dis.get_instructions(code)[f_lasti // 2]``, which is off once caches exist, and it does not
   know 3.11's jump opcodes, so ``if <traced tensor>:`` fails. We give the proxy module a ``dis``
   whose instruction list is indexed by code unit, and add the 3.11 jump opcodes.

If the patched tracer still fails on a model, :func:`speedup` falls back to
``torch.fx.symbolic_trace`` (which cannot follow data-dependent ``if``) and reports both errors.
"""
from __future__ import annotations

import copy
import dis
import functools
import logging
import types
from typing import Any

import torch
from torch import nn

from de_plugin.adapter import apply_masks, channel_groups, kept_channels, slice_channels

log = logging.getLogger("de_plugin_nni")
_PATCHED = False
_DROP = ("_make_subclass", "_make_wrapper_subclass", "_dtensor__new__")


class _CodeUnitDis(types.ModuleType):
    """``dis`` whose ``get_instructions`` list has one entry per 2-byte code unit.

    A cache slot maps to the next real instruction, so ``insts[f_lasti // 2]`` is the executing
    instruction and ``insts[cur + 1]`` the one after it, as NNI's proxy assumes.
    """

    def __getattr__(self, name: str) -> Any:
        return getattr(dis, name)

    @staticmethod
    def get_instructions(code, **kwargs):
        real = list(dis.get_instructions(code))
        out, j = [], 0
        for i in range(len(code.co_code) // 2):
            while j < len(real) - 1 and real[j].offset < 2 * i:
                j += 1
            out.append(real[j])
        return out


def patch_concrete_tracer() -> None:
    """Apply the three runtime fixes above, once (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    import nni.common.concrete_trace_utils.concrete_proxy as cp
    import nni.common.concrete_trace_utils.concrete_tracer as ct

    table = ct.ConcreteTracer.default_autowrap_leaf_function
    for func in list(table):
        if getattr(func, "__module__", "") is None and getattr(func, "__name__", "") in _DROP:
            del table[func]
    original = ct.node_is_impure_wrapper

    @functools.wraps(original)
    def node_is_impure(node, *args, **kwargs):
        return original(node)

    ct.node_is_impure_wrapper = node_is_impure
    cp.dis = _CodeUnitDis("dis")
    extra = {code for name, code in dis.opmap.items() if name.startswith(("POP_JUMP_", "JUMP_IF_"))}
    cp.ConcreteProxy.jump_opcodes = tuple(sorted(set(cp.ConcreteProxy.jump_opcodes) | extra))
    _PATCHED = True


def trace(model: nn.Module, dummy_input: Any) -> torch.fx.GraphModule:
    """The graph ModelSpeedup works on: NNI's concrete tracer, else ``torch.fx.symbolic_trace``.

    Only a tracing failure falls back to the other tracer; neither touches the model, so the
    fallback runs on the model as the user gave it.
    """
    from nni.common.concrete_trace_utils import concrete_trace
    from nni.compression.speedup.model_speedup import _normalize_input

    try:
        return concrete_trace(model, dummy_input if isinstance(dummy_input, dict) else _normalize_input(dummy_input))
    except Exception as concrete_error:  # noqa: BLE001 - report both tracers' errors below
        log.warning("NNI's concrete tracer failed (%s); trying torch.fx.symbolic_trace", concrete_error)
        try:
            return torch.fx.symbolic_trace(model)
        except Exception as fx_error:
            raise RuntimeError(
                f"ModelSpeedup cannot trace this model. NNI's concrete tracer: {concrete_error!r}; "
                f"torch.fx: {fx_error!r}. Make the failing op traceable or exclude its layers."
            ) from fx_error


def speedup(model: nn.Module, dummy_input: Any, masks: dict, engine: str = "auto", **kwargs: Any) -> nn.Module:
    """Shrink ``model`` in place using ``masks`` (NNI format ``{module_name: {"weight": mask, ...}}``).

    ``engine``: ``"nni"``, NNI's ``ModelSpeedup`` (errors raised as they are); ``"de_plugin"``, the core's
    slicing from the coupling groups (:func:`de_plugin.adapter.slice_channels`); ``"auto"`` (default),
    ModelSpeedup on a copy, kept if it runs and computes what the masked model computes on
    ``dummy_input`` (eval mode), else the core's slicing with a warning (NNI 3.0 raises EmptyLayerError on
    ConvNeXt's channels-last MLPs and runs out of memory on MaxViT: BENCHMARKS.md, the zoo table; which
    one ran is logged). The model is returned in eval mode (NNI leaves replaced BatchNorms in train mode).
    """
    if engine not in ("auto", "nni", "de_plugin"):
        raise ValueError(f"engine={engine!r}: use 'auto', 'nni' or 'de_plugin'")
    _check_masks(model, masks)
    was_training = model.training
    model.eval()
    if engine == "de_plugin":
        slice_channels(model, dummy_input, masks)
    elif engine == "nni":
        _nni_speedup(model, dummy_input, masks, **kwargs)
    else:
        _auto(model, dummy_input, masks, **kwargs)
    model.eval()
    if was_training:
        log.info("speedup: model returned in eval mode")
    return model


def _check_masks(model: nn.Module, masks: dict) -> None:
    """Masks that name no module, or whose shape is not their tensor's, are refused before any work."""
    modules = dict(model.named_modules())
    for name, params in masks.items():
        if name not in modules:
            near = [n for n in modules if n.endswith(name.split(".")[-1])][:3]
            raise ValueError(f"masks name module {name!r}, which the model does not have"
                             + (f" (did you mean {near}?)" if near else "") +
                             "; use the names of model.named_modules() (NNI's get_masks() keys)")
        for pname, m in params.items():
            t = getattr(modules[name], pname, None)
            if isinstance(m, torch.Tensor) and isinstance(t, torch.Tensor) and m.shape != t.shape:
                raise ValueError(f"the mask of {name}.{pname} has shape {tuple(m.shape)}, the tensor "
                                 f"{tuple(t.shape)}: masks must have their tensor's shape")


def _auto(model: nn.Module, dummy_input: Any, masks: dict, **kwargs: Any) -> None:
    """ModelSpeedup on a copy (it edits modules as it goes, so a failure part-way must not reach the
    user's model); adopted only if it runs and its outputs on ``dummy_input`` equal the masked
    model's, else the core's slicing on the model itself."""
    trial = copy.deepcopy(model)
    try:
        _nni_speedup(trial, dummy_input, masks, **kwargs)
    except Exception as exc:  # noqa: BLE001 - fall back to the core's slicing, say why
        log.warning("speedup: NNI's ModelSpeedup failed (%s: %s); slicing the channels from the coupling groups "
                    "instead", type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        slice_channels(model, dummy_input, masks)
        return
    expected = _outputs(masked_copy(model, masks, dummy_input), dummy_input)
    diff = _max_difference(_outputs(trial, dummy_input), expected)
    if diff is not None:
        # Quirk (NNI 3.0): ModelSpeedup can run to the end and still compute something else than the
        # masked model (a replaced module's constant folding, a mask it propagated too far)
        log.warning("speedup: NNI's ModelSpeedup result differs from the masked model on the dummy input (%s); "
                    "slicing the channels from the coupling groups instead", diff)
        slice_channels(model, dummy_input, masks)
        return
    model.__dict__.update(trial.__dict__)  # adopt the sped-up modules in place, as ModelSpeedup does
    log.info("speedup: NNI's ModelSpeedup (outputs equal to the masked model's)")


def flat_masks(masks: dict) -> dict:
    """NNI's ``{module: {target: mask}}`` as the core's ``{"module.target": mask}`` (None masks dropped)."""
    return {f"{name}.{target}": m for name, targets in masks.items() for target, m in targets.items()
            if isinstance(m, torch.Tensor)}


def masked_copy(model: nn.Module, masks: dict, dummy_input: Any = None) -> nn.Module:
    """A copy of ``model`` in eval mode with every masked tensor multiplied by its mask: what a
    speedup must compute (NNI's built-ins leave the values behind their masks after unwrapping).

    With ``dummy_input``, a channel whose producers' weight rows are all masked is removed as a
    speedup removes it: the BatchNorm affine terms over it are zeroed too (else the masked model
    feeds BatchNorm's shift of a zero channel forward, which no smaller model computes). The
    BatchNorms over a channel come from the core's coupling pass, on NNI's concrete trace where torch.fx
    cannot trace the model; a model neither traces keeps them.
    """
    ref = copy.deepcopy(model).eval()
    modules = dict(ref.named_modules())
    apply_masks(ref, flat_masks(masks), strict=False)
    if dummy_input is not None:
        with torch.no_grad():
            _zero_removed_batchnorms(ref, modules, masks, dummy_input)
    return ref


def _zero_removed_batchnorms(ref: nn.Module, modules: dict, masks: dict, dummy_input: Any) -> None:
    try:
        groups = channel_groups(ref, dummy_input)
    except Exception:  # noqa: BLE001 - torch.fx cannot trace it: NNI's concrete trace resolves data-dependent ifs
        try:
            groups = channel_groups(trace(ref, dummy_input), dummy_input)
        except Exception as exc:  # noqa: BLE001 - the reference stays the plainly masked model
            log.debug("speedup: no coupling groups for the reference (%s)", exc)
            return
    flat = {f"{k}.{p}": m for k, v in masks.items() for p, m in v.items() if isinstance(m, torch.Tensor)}
    for g in groups:
        try:
            keep = kept_channels(g, flat)  # the core's reading of a group's removed channels
        except ValueError:  # every channel removed: nothing a speedup could keep either
            continue
        if keep is None:
            continue
        removed = torch.from_numpy(~keep)
        for bn, offset in g.batchnorms:
            for pname in ("weight", "bias"):
                t = getattr(modules[bn], pname, None)
                if isinstance(t, torch.Tensor):
                    t[offset:offset + len(removed)][removed] = 0


def _outputs(model: nn.Module, dummy_input: Any) -> list[torch.Tensor]:
    """The model's output tensors on ``dummy_input`` (NNI's convention: a tuple is unpacked, a dict
    passed by keyword), flattened in order."""
    model.eval()
    with torch.no_grad():
        if isinstance(dummy_input, dict):
            out = model(**dummy_input)
        elif isinstance(dummy_input, (tuple, list)):
            out = model(*dummy_input)
        else:
            out = model(dummy_input)
    flat: list[torch.Tensor] = []

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            flat.append(o.float())
        elif isinstance(o, dict):
            for k in sorted(o):
                walk(o[k])
        elif isinstance(o, (tuple, list)):
            for v in o:
                walk(v)

    walk(out)
    return flat


def _max_difference(got: list[torch.Tensor], expected: list[torch.Tensor]) -> str | None:
    """None when the outputs agree to float32 rounding (relative to the outputs' scale), else why not."""
    if len(got) != len(expected):
        return f"{len(got)} output tensors instead of {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape:
            return f"output {i} has shape {tuple(g.shape)} instead of {tuple(e.shape)}"
        scale = float(e.abs().max()) if e.numel() else 0.0
        err = float((g - e).abs().max()) if e.numel() else 0.0
        if not err <= 1e-4 * (1.0 + scale):  # also catches NaN
            return f"output {i}: max abs difference {err:.3g} at output scale {scale:.3g}"
    return None


def _nni_speedup(model: nn.Module, dummy_input: Any, masks: dict, **kwargs: Any) -> None:
    from nni.compression.speedup import ModelSpeedup

    patch_concrete_tracer()
    # plain dicts (NNI may save them with torch.save) of copies: ModelSpeedup's mask propagation edits the
    # tensors in place (NNI 3.0), which would leave the caller's masks, and a fallback's, emptied
    masks = {k: {p: m.clone() if isinstance(m, torch.Tensor) else m for p, m in v.items()} for k, v in masks.items()}
    if "graph_module" not in kwargs:
        kwargs["graph_module"] = trace(model, dummy_input)
    # Quirk (NNI 3.0): a mask for a module the eval graph never calls (GoogLeNet's / Inception's
    # auxiliary classifiers run in training only) fails the speedup with a KeyError; leave them out
    called = {str(n.target) for n in kwargs["graph_module"].graph.nodes if n.op == "call_module"}
    skipped = sorted(k for k in masks if k not in called)
    if skipped:
        log.info("speedup: %d masked module(s) never called in eval mode, left as they are: %s", len(skipped), skipped)
        masks = {k: v for k, v in masks.items() if k in called}
    # Quirk (NNI 3.0): ModelSpeedup logs every graph node at INFO through its own handler and the root
    # logger (~300 lines, each twice); its messages go to a logger of ours, shown with --verbose only
    verbose = logging.getLogger("de_plugin").isEnabledFor(logging.DEBUG)
    quiet = logging.getLogger("de_plugin_nni.speedup")
    quiet.setLevel(logging.DEBUG if verbose else logging.WARNING)
    kwargs.setdefault("logger", quiet)
    nni_loggers = [logging.getLogger(n) for n in ("nni.compression.speedup", "nni.compression.utils.mask_conflict")]
    levels = [lg.level for lg in nni_loggers]
    for lg in nni_loggers:
        lg.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        # tracing is done, the model untouched: any error from here on is the speedup's own, raised as it is
        ModelSpeedup(model, dummy_input, masks, **kwargs).speedup_model()
    finally:
        for lg, level in zip(nni_loggers, levels):
            lg.setLevel(level)
