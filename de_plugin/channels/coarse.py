"""``random_coarse``: feature-map and kernel pruning by the best of N random masks (Anwar & Sung).

A candidate removes, in every coupled channel group (:mod:`de_plugin.channels.coupling`), a random set of
``round(ratio * channels)`` feature maps, and in every selected conv a random ``kernel_ratio`` of
the k x k kernels that are still alive. Each candidate is applied in place to one working copy,
optionally has its BatchNorm statistics re-estimated on a few training batches (EagleEye's
adaptive BN: without it the ranking of candidates on BN networks is unreliable), is scored on the
validation split without training, and is undone: memory stays flat in N. The best candidate is
kept and the network retrained once with its mask held.

A removed feature map zeroes its filter, bias, BatchNorm affine terms, any depthwise conv over it,
and the input columns of its consumers, so the masked model computes exactly what the physically
smaller model (NNI's ``ModelSpeedup``) computes; MACs and parameters are counted from the masks.
``l1_filter`` (Li et al., ICLR 2017) is the same machinery keeping the largest-L1 filters.
"""
from __future__ import annotations

import fnmatch
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from .coupling import ChannelGroup, CouplingError, channel_groups
from ..evaluation import (BackendOptions, BNState, batch_norms, DeviceBatches, check_score, make_backend, metric_on_batches, recalibrate_bn)
from ..hookspecs import hookimpl
from ..progress import progress_bar
from ..pruner import Context, Pruner
from ..registry import get_metric
from ..result import Outcome
from ..runner import RoundLoop, RoundRecord
from ..targets import Target, apply_masks, masks_attached

log = logging.getLogger("de_plugin")
Masks = dict[str, torch.Tensor]  # "module.param" -> bool mask shaped like the parameter


class CoarseOptions(BackendOptions):
    """Options of ``random_coarse`` / ``l1_filter``. Ratios are fractions of a layer's output
    channels (``feature_map_ratio``) or of its alive k x k kernels (``kernel_ratio``)."""

    feature_map_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    #: fraction of the output features (hidden units) of selected Linear layers: MLP blocks of ViTs and
    #: ConvNeXts, a LeNet's hidden layers. 0 = Linear layers only lose the input columns of removed maps
    linear_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    kernel_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    #: per-layer feature-map ratios (module names or fnmatch patterns), overriding the uniform one
    ratios: dict[str, float] = Field(default_factory=dict)
    kernel_ratios: dict[str, float] = Field(default_factory=dict)
    candidates: int = Field(100, ge=1)
    #: channel groups whose ops the coupling pass cannot follow: "raise" (one error naming every such group
    #: and op) or "skip" (leave them unpruned, prune the rest, warn)
    unresolved: Literal["raise", "skip"] = "raise"
    #: "evaluate": the user's evaluate; "accuracy" / "neg_loss": computed on ``val_data`` batches
    score: Literal["evaluate", "accuracy", "neg_loss"] = "evaluate"
    #: re-estimate BatchNorm statistics before scoring each candidate; None = on if the model has BN
    adaptive_bn: Optional[bool] = None
    bn_batches: int = Field(50, ge=1)
    finetune_epochs: int = Field(1, ge=0)
    criterion: Literal["random", "l1"] = "random"
    #: layers whose output channels a framework declares coupled (NNI's ``dependency_group_id``): merged into
    #: the groups the coupling pass finds
    couple: Optional[list[list[str]]] = None
    #: candidates are independent: score them on local processes or Ray actors (no ``batched``:
    #: each candidate re-estimates BatchNorm statistics, which vmap cannot batch)
    backend: Literal["serial", "process", "ray"] = Field("serial", description="where candidates are scored")

    @field_validator("ratios", "kernel_ratios")
    @classmethod
    def _fractions(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if not 0.0 <= float(r) < 1.0:
                raise ValueError(f"ratio for {k!r} must lie in [0, 1), got {r}")
        return v


def _match(name: str, table: dict[str, float]) -> Optional[float]:
    hits = [r for p, r in table.items() if name == p or fnmatch.fnmatchcase(name, p)]
    return hits[-1] if hits else None


def capture_input(model: nn.Module, run: Callable[[], Any]) -> Any:
    """The first input ``model`` receives while ``run()`` executes (two samples of it)."""
    seen: list = []

    def hook(_mod, args):
        if not seen:
            seen.append(tuple(a[:2].detach() if isinstance(a, torch.Tensor) else a for a in args))

    handle = model.register_forward_pre_hook(hook)
    try:
        out = run()
    finally:
        handle.remove()
    if not seen:
        raise ValueError("`evaluate` never called the model's forward; random_coarse needs it to trace the model")
    return (seen[0] if len(seen[0]) > 1 else seen[0][0]), out


class CoarseSpace:
    """The coupled groups and conv kernels of a model, and how a candidate becomes masks."""

    def __init__(self, model: nn.Module, example_input: Any, producers: Sequence[str], options: CoarseOptions,
                 couple: Optional[Sequence[Sequence[str]]] = None):
        self.model = model
        self.modules = dict(model.named_modules())
        fm = options.feature_map_ratio > 0 or options.linear_ratio > 0 or any(r > 0 for r in options.ratios.values())
        selected = set(producers)
        for key, table in (("ratios", options.ratios), ("kernel_ratios", options.kernel_ratios)):
            unmatched = [p for p in table if not any(n == p or fnmatch.fnmatchcase(n, p) for n in producers)]
            if unmatched:
                raise ValueError(f"`{key}` keys {unmatched} match no selected Conv2d / Linear layer; selected: "
                                 f"{', '.join(producers[:12])}{' ...' if len(producers) > 12 else ''}")
        self.groups: list[ChannelGroup] = []
        self.group_ratio: list[float] = []
        if fm:
            unresolved: list[ChannelGroup] = []
            for g in channel_groups(model, example_input, couple):
                ratio = self._group_ratio(g, selected, options)
                if ratio is not None and g.unresolved:
                    unresolved.append(g)
                elif ratio is not None:
                    self.groups.append(g)
                    self.group_ratio.append(ratio)
            self._unresolved(unresolved, options)
        self.kernel_layers: list[str] = []
        self.kernel_ratio: list[float] = []
        for p in producers:
            m = self.modules[p]
            r = _match(p, options.kernel_ratios)
            r = options.kernel_ratio if r is None else r
            if isinstance(m, nn.Conv2d) and m.groups == 1 and r > 0:
                self.kernel_layers.append(p)
                self.kernel_ratio.append(r)
        if not self.groups and not self.kernel_layers:
            raise ValueError("random_coarse has nothing to prune: no selected Conv2d layer has prunable feature maps "
                             "(all reach the output or are excluded) and kernel_ratio is 0")
        self.params = self._param_names()

    def _group_ratio(self, g: ChannelGroup, selected: set[str], options: CoarseOptions) -> Optional[float]:
        """The ratio ``g`` is pruned at, None when it is not pruned; errors for ratios it cannot take."""
        if not set(g.producers) <= selected or g.locked:
            log.debug("group %s not pruned (%s)", g.producers, g.locked or "not all producers selected")
            return None
        ratios = {p: _match(p, options.ratios) for p in g.producers}
        given = {r for r in ratios.values() if r is not None}
        if len(given) > 1:
            raise ValueError(f"layers {g.producers} share channels (residual add / depthwise) and must be pruned "
                             f"at one ratio; `ratios` gives {ratios}")
        convs = any(isinstance(self.modules[p], nn.Conv2d) for p in g.producers)
        ratio = given.pop() if given else (options.feature_map_ratio if convs else options.linear_ratio)
        if not convs and ratio == 0:
            return None  # Linear hidden units are pruned only when asked for
        if g.unresolved:
            return ratio  # reported with the others by _unresolved
        per_block = int(round(ratio * g.block))
        if g.block > 1 and per_block >= g.block:
            grouped = ", ".join(m for m, _ in g.grouped)
            raise ValueError(f"ratio {ratio} would remove all {g.block} channels of every group of the grouped conv(s) "
                             f"{grouped} (channels of {g.producers} are removed evenly per conv group); use a ratio "
                             f"below {1 - 0.5 / g.block:.3f} or exclude {g.producers[0]}")
        if removals(g, ratio) >= g.channels:
            raise ValueError(f"ratio {ratio} would remove every one of the {g.channels} channels of "
                             f"{g.producers}; use a ratio below {1 - 0.5 / g.channels:.3f}")
        return ratio

    @staticmethod
    def _unresolved(groups: list[ChannelGroup], options: CoarseOptions) -> None:
        """One error naming every group the pass cannot follow and its ops, or a warning with "skip"."""
        if not groups:
            return
        ops = sorted({u.split(" (node")[0] for g in groups for u in g.unresolved})
        layers = [p for g in groups for p in g.producers]
        if options.unresolved == "skip":
            log.warning("random_coarse: %d channel group(s) left unpruned: their channels pass through ops the "
                        "coupling pass cannot follow (%s); layers %s", len(groups), "; ".join(ops[:5]), layers[:12])
            return
        raise CouplingError(
            f"cannot resolve which channels of {len(groups)} group(s) are coupled: they pass through "
            f"{ops[:8]}{' ...' if len(ops) > 8 else ''}. Exclude their layers (exclude={layers}), leave them unpruned "
            "with unresolved='skip', or use kernel granularity (feature_map_ratio=0)")

    def _param_names(self) -> list[str]:
        names: list[str] = []

        def add(module: str, pname: str) -> None:
            if getattr(self.modules[module], pname, None) is not None and f"{module}.{pname}" not in names:
                names.append(f"{module}.{pname}")

        for g in self.groups:
            for m in g.producers + [b for b, _ in g.batchnorms + g.depthwise + g.grouped]:
                add(m, "weight")
                add(m, "bias")
            for name, _, _ in g.params:
                if name not in names:
                    names.append(name)
            for m, _, _ in g.consumers:
                add(m, "weight")
        for m in self.kernel_layers:
            add(m, "weight")
        return names

    def param(self, name: str) -> torch.Tensor:
        module, _, pname = name.rpartition(".")
        return getattr(self.modules[module], pname)

    # ------------------------------------------------------------------ candidates
    def sample(self, rng: np.random.Generator, criterion: str = "random") -> dict[str, Any]:
        """Kept channels per group and kept kernels per conv (bool arrays)."""
        keep_ch: list[np.ndarray] = []
        for g, ratio in zip(self.groups, self.group_ratio):
            norms = None
            if criterion == "l1":
                norms = sum(self.param(p + ".weight").detach().abs().flatten(1).sum(1).cpu().numpy() for p in g.producers)
            keep_ch.append(drop_channels(g, ratio, rng, norms))
        in_keep, out_keep = self.alive(keep_ch)
        keep_k: list[np.ndarray] = []
        for layer, ratio in zip(self.kernel_layers, self.kernel_ratio):
            w = self.param(layer + ".weight")
            alive = np.outer(out_keep.get(layer, np.ones(w.shape[0], bool)), in_keep.get(layer, np.ones(w.shape[1], bool)))
            idx = np.flatnonzero(alive)
            remove = int(round(ratio * len(idx)))
            if criterion == "l1":
                norms = w.detach().abs().flatten(2).sum(2).cpu().numpy().ravel()[idx]
                order = idx[np.argsort(norms, kind="stable")]
            else:
                order = rng.permutation(idx)
            # never a whole filter nor a whole input map: either would remove a feature map outside
            # its coupled group (and NNI's speedup would then shrink one branch of an add only)
            rows, cols = alive.sum(1), alive.sum(0)
            drop = []
            for j in order:
                if len(drop) == remove:
                    break
                r, c = divmod(int(j), alive.shape[1])
                if rows[r] > 1 and cols[c] > 1:
                    rows[r] -= 1
                    cols[c] -= 1
                    drop.append(j)
            drop = np.array(drop, dtype=np.int64)
            k = alive.copy().ravel()
            k[drop] = False
            keep_k.append(k.reshape(alive.shape))
        return {"channels": keep_ch, "kernels": keep_k}

    def alive(self, keep_ch: list[np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Per conv: which input and output channels survive the feature-map part."""
        in_keep: dict[str, np.ndarray] = {}
        out_keep: dict[str, np.ndarray] = {}
        for g, k in zip(self.groups, keep_ch):
            for p in g.producers:
                out_keep[p] = k
            for m, off, rep in g.consumers:
                w = self.param(m + ".weight")
                if w.dim() == 4:
                    arr = in_keep.setdefault(m, np.ones(w.shape[1], bool))
                    arr[off:off + len(k)] &= k
        return in_keep, out_keep

    def masks(self, cand: dict[str, Any]) -> Masks:
        """Bool masks shaped like each affected parameter."""
        out: Masks = {}

        def mask(name: str) -> torch.Tensor:
            if name not in out:
                p = self.param(name)
                out[name] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
            return out[name]

        for g, k in zip(self.groups, cand["channels"]):
            drop = torch.from_numpy(np.flatnonzero(~k))
            for m, off in [(p, 0) for p in g.producers] + g.batchnorms + g.depthwise + g.grouped:
                for pname in ("weight", "bias"):
                    if f"{m}.{pname}" in self.params:
                        mask(f"{m}.{pname}")[off + drop] = False
            for m, off in g.grouped:  # the removed channel is also an input of the other filters of its conv group
                per = self.modules[m].in_channels // self.modules[m].groups
                w = mask(f"{m}.weight")
                for c in (off + drop).tolist():
                    w[c - c % per: c - c % per + per, c % per] = False
            for name, dim, off in g.params:
                mask(name).index_fill_(dim, off + drop, False)
            for m, off, rep in g.consumers:
                cols = (off + drop[:, None] * rep + torch.arange(rep)[None, :]).flatten()
                mask(f"{m}.weight")[:, cols] = False
        for layer, k in zip(self.kernel_layers, cand["kernels"]):
            m = mask(f"{layer}.weight")
            m &= torch.from_numpy(k).to(m.device)[:, :, None, None]
        return out

    def kept_channels(self, cand: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"layers": g.producers, "channels": g.channels, "kept": int(k.sum())}
                for g, k in zip(self.groups, cand["channels"])]


def removals(g: ChannelGroup, ratio: float) -> int:
    """How many of ``g``'s channels a ratio removes: ``round(ratio * channels)``, or with a grouped conv
    over the group, ``round(ratio * block)`` in each run of ``block`` channels (its conv groups)."""
    if g.block > 1:
        return int(round(ratio * g.block)) * (g.channels // g.block)
    return int(round(ratio * g.channels))


def drop_channels(g: ChannelGroup, ratio: float, rng: np.random.Generator, norms: Optional[np.ndarray] = None,
                  ) -> np.ndarray:
    """Kept channels of ``g`` (bool): ``removals(g, ratio)`` dropped at random (or the smallest ``norms``),
    evenly per conv group when a grouped conv runs over the group."""
    block = g.block if g.block > 1 else g.channels
    per = int(round(ratio * block))
    keep = np.ones(g.channels, dtype=bool)
    for start in range(0, g.channels, block):
        order = np.argsort(norms[start:start + block], kind="stable") if norms is not None else rng.permutation(block)
        keep[start + order[:per]] = False
    return keep


class InPlaceMasks:
    """Apply masks to the model's own tensors and put the saved values back (no model copies)."""

    def __init__(self, model: nn.Module, space: CoarseSpace):
        self.model = model
        self.space = space
        self.saved = {n: space.param(n).detach().clone() for n in space.params}
        self.bn = BNState(model)

    def apply(self, masks: Masks) -> None:
        apply_masks(self.model, masks)

    def restore(self) -> None:
        with torch.no_grad():
            for n, v in self.saved.items():
                self.space.param(n).copy_(v)
        self.bn.restore()

    @contextmanager
    def applied(self, masks: Masks) -> Iterator[None]:
        self.apply(masks)
        try:
            yield
        finally:
            self.restore()


def count_macs(model: nn.Module, example_input: Any, masks: Optional[Masks] = None) -> dict[str, Any]:
    """Multiply-accumulates of one sample through Conv/Linear layers, and parameter counts.

    With ``masks``, a removed kernel / weight costs nothing, which is what the sped-up model costs
    for feature-map masks; ``params`` counts the model's parameters left non-zero by the masks.
    """
    masks = masks or {}
    per_layer: dict[str, int] = {}
    dense: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def hook(m, _inp, out, name=name):
                w = masks.get(f"{name}.weight")
                if isinstance(m, nn.Conv2d):
                    spatial = out.shape[2] * out.shape[3]
                    k = m.kernel_size[0] * m.kernel_size[1]
                    kernels = m.weight.shape[0] * m.weight.shape[1]
                    alive = kernels if w is None else int(w.flatten(2).any(2).sum())
                    dense[name] = spatial * kernels * k
                    per_layer[name] = spatial * alive * k
                else:
                    rows = out.numel() // out.shape[-1] // out.shape[0]
                    dense[name] = rows * m.weight.numel()
                    per_layer[name] = rows * (m.weight.numel() if w is None else int(w.sum()))
            handles.append(mod.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*(t[:1] if isinstance(t, torch.Tensor) else t for t in x))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    total = sum(p.numel() for p in model.parameters())
    removed = sum(int((~m).sum()) for m in masks.values())
    return {"macs": sum(per_layer.values()), "macs_dense": sum(dense.values()), "layer_macs": per_layer,
            "params": total - removed, "params_dense": total}


class CoarseScorer:
    """Scores one candidate in place: apply its masks, re-estimate BatchNorm (adaptive BN),
    score, put everything back. The scorer protocol of :mod:`de_plugin.evaluation`, so the
    candidates can also be scored by forked workers or Ray actors."""

    def __init__(self, model: nn.Module, space: CoarseSpace, score: Callable[[nn.Module], float],
                 calib: Optional[Sequence[Any]], bn_batches: int):
        self.model, self.space, self.score_fn, self.calib, self.bn_batches = model, space, score, calib, bn_batches
        self.reset()

    def reset(self) -> None:
        self.working = InPlaceMasks(self.model, self.space)

    def score(self, candidate: dict[str, Any], floor: Optional[float] = None) -> float:
        with self.working.applied(self.space.masks(candidate)):
            if self.calib:
                recalibrate_bn(self.model, self.calib, self.bn_batches)
            return check_score(self.score_fn(self.model))

    def restore(self) -> None:
        self.working.restore()


def best_of_n(model: nn.Module, space: CoarseSpace, score: Callable[[nn.Module], float], options: CoarseOptions,
              seed: int, calib: Optional[Sequence[Any]] = None, progress: bool = True, desc: str = "random_coarse",
              ) -> tuple[dict[str, Any], float, list[float]]:
    """Score ``options.candidates`` random candidates (one for ``criterion="l1"``) and return
    ``(best candidate, its score, every score in drawing order)``.

    Candidates are drawn first (the draw only uses the seeded generator, so they are the same
    whichever backend scores them), then scored in place by ``options.backend``; the first best
    wins ties. The model is left exactly as it was. ``calib`` batches switch on adaptive BatchNorm.
    """
    rng = np.random.default_rng(seed)
    n = 1 if options.criterion == "l1" else options.candidates
    cands = [space.sample(rng, options.criterion) for _ in range(n)]
    scorer = CoarseScorer(model, space, score, calib, options.bn_batches)
    name = options.backend if n > 1 else "serial"
    backend = make_backend(name, scorer, options.workers, options.threads_per_worker, options.ray_address,
                           runtime_env=options.ray_runtime_env)
    step = 1 if name == "serial" else 4 * options.workers  # progress after every few rounds of the pool
    scores: list[float] = []
    try:
        backend.start_round()
        with progress_bar(total=n, desc=f"{desc} candidates", enabled=bool(progress) and n > 1) as bar:
            for start in range(0, n, step):
                scores += backend.evaluate(cands[start:start + step])
                bar.update(min(step, n - start))
        backend.end_round()
    finally:
        backend.close()
    b = int(np.argmax(scores))  # first maximum, as a running "strictly better" scan
    return cands[b], scores[b], scores


@dataclass
class CoarseSearch:
    """What the best-of-N search found: the candidate, its masks and what they cost."""

    space: CoarseSpace
    best: dict[str, Any]  #: kept channels per coupled group, kept kernels per conv (bool arrays)
    score: float
    scores: list[float]  #: every candidate's score, in drawing order
    masks: Masks  #: every affected parameter (weights, biases, BatchNorm terms, consumers' columns)
    calib: Optional[list]  #: adaptive-BN batches (None: off)
    macs: dict[str, Any] = field(default_factory=dict)  #: :func:`count_macs` of the masks

    @property
    def groups(self) -> list[dict[str, Any]]:
        return self.space.kept_channels(self.best)

    def channel_keep(self) -> dict[str, np.ndarray]:
        """Kept output channels of every pruned producer conv."""
        return {p: k for g, k in zip(self.space.groups, self.best["channels"]) for p in g.producers}


def coarse_search(model: nn.Module, space: CoarseSpace, example: Any, score: Callable[[nn.Module], float],
                  options: CoarseOptions, seed: int, *, train_batches: Optional[list] = None,
                  val_batches: Optional[list] = None, progress: bool = True, desc: str = "random_coarse",
                  ) -> CoarseSearch:
    """The one coarse search (core, NNI and INC): adaptive-BN batches, best of N, masks, MACs.
    The model is left as it was."""
    calib = calibration_batches(model, options, train_batches, val_batches)
    best, best_score, scores = best_of_n(model, space, score, options, seed, calib, progress, desc)
    masks = space.masks(best)
    return CoarseSearch(space, best, best_score, scores, masks, calib, count_macs(model, example, masks))


def calibration_batches(model: nn.Module, options: CoarseOptions, train_batches: Optional[list],
                        val_batches: Optional[list]) -> Optional[list]:
    """The batches adaptive BN re-estimates statistics on, or None when it is off."""
    has_bn = bool(batch_norms(model))
    if not has_bn or options.adaptive_bn is False:
        return None
    if not (train_batches or val_batches):
        raise ValueError("adaptive_bn (on by default for models with BatchNorm) needs batches to re-estimate the "
                         "statistics: pass train_data=... (an iterable of (x, y) batches) or adaptive_bn=False")
    if not train_batches:
        log.warning("adaptive BN uses the validation batches (no train_data given)")
    return list(train_batches or val_batches)


def apply_and_retrain(model: nn.Module, space: CoarseSpace, masks: Masks, finetune: Optional[Callable],
                      options: CoarseOptions, seed: int, calib: Optional[list] = None,
                      score: Optional[Callable[[nn.Module], float]] = None, desc: str = "random_coarse",
                      ) -> Optional[float]:
    """Zero the masked entries in place, re-estimate BN, retrain once with the masks held.

    Returns the score before retraining (when ``score`` is given).
    """
    apply_masks(model, masks)
    if calib:
        recalibrate_bn(model, calib, options.bn_batches)
    before = score(model) if score is not None else None
    targets = [Target(*n.rpartition(".")[::2], type(space.modules[n.rpartition(".")[0]]).__name__,
                      tuple(space.param(n).shape)) for n in masks]
    if finetune is not None and options.finetune_epochs > 0:
        torch.manual_seed(seed)
        with masks_attached(model, targets, masks):
            finetune(model, options.finetune_epochs)
    elif finetune is None:
        log.warning("%s: no `finetune` given, the network is not retrained", desc)
    return before


class RandomCoarse(Pruner):
    """Best of N random feature-map / kernel masks, then one retraining (Anwar & Sung, 2017)."""

    name = "random_coarse"
    Options = CoarseOptions
    goal = "ratios"
    #: set by the round loop (one round here: nothing to resume within it); fitness evaluations
    nfev: int = 0
    checkpointer: Any = None

    def runner(self) -> "CoarseRound":
        """The (single-round) loop to step yourself, like every iterative pruner's."""
        return CoarseRound(self)

    def run(self, ctx: Context) -> Outcome:
        return self.runner().run(ctx)

    def setup(self, ctx: Context) -> None:
        """The model's input and dense score (one call of ``evaluate``), the coupled channel groups; every
        check before the search."""
        o: CoarseOptions = self.options  # type: ignore[assignment]
        self.example, self.reference = capture_input(ctx.model, lambda: ctx.score(ctx.model))
        producers = [t.module_name for t in ctx.targets if t.module_type in ("Conv2d", "Linear")
                     and t.param_name == "weight"]
        if not any(t.module_type == "Conv2d" for t in ctx.targets) and not (o.linear_ratio > 0 or o.ratios):
            raise ValueError("random_coarse prunes Conv2d feature maps and kernels (and Linear hidden units with "
                             "linear_ratio > 0): the selection has no Conv2d layer (check `layers` / `layer_types` / "
                             "`exclude`)")
        self.space = CoarseSpace(ctx.model, self.example, producers, o, o.couple)

    def round(self, ctx: Context) -> dict[str, Any]:
        """The one round: the best of ``candidates`` masks, applied, one retraining; its record."""
        o: CoarseOptions = self.options  # type: ignore[assignment]
        model, space, t0 = ctx.model, self.space, time.perf_counter()
        self.found = found = coarse_search(model, space, self.example, self._scorer(ctx, o), o, ctx.seed,
                                           train_batches=ctx.train_batches, val_batches=ctx.val_batches,
                                           progress=ctx.progress, desc=self.name)
        self.nfev = len(found.scores)
        search_s = time.perf_counter() - t0
        self.before_ft = apply_and_retrain(model, space, found.masks, ctx.finetune, o, ctx.seed, found.calib,
                                           ctx.score, self.name)
        accuracy = ctx.score(model)
        macs = found.macs
        log.info("%s: best of %d candidates val %.4f (reference %.4f), after retraining %.4f; MACs %.1f%% removed",
                 self.name, len(found.scores), found.score, self.reference, accuracy,
                 100 * (1 - macs["macs"] / macs["macs_dense"]))
        return {"round": 0, "candidate_scores": found.scores, "val_accuracy_before_finetune": self.before_ft,
                "accuracy_after_finetune": accuracy, "macs_kept": macs["macs"] / macs["macs_dense"],
                "search_seconds": search_s, "finetune_seconds": time.perf_counter() - t0 - search_s}

    def outcome(self, ctx: Context, history: list) -> Outcome:
        """The masks of the one round, MACs and parameters, the candidates' scores."""
        found, example, macs = self.found, self.example, self.found.macs
        extra = {
            "groups": found.groups, "candidate_scores": found.scores, "best_candidate_score": found.score,
            "accuracy_before_retraining": self.before_ft, "adaptive_bn": found.calib is not None,
            "macs": macs["macs"], "macs_dense": macs["macs_dense"], "macs_kept": macs["macs"] / macs["macs_dense"],
            "params": macs["params"], "params_dense": macs["params_dense"],
            "params_kept": macs["params"] / macs["params_dense"], "layer_macs": macs["layer_macs"],
            "example_input_shape": list(example.shape) if isinstance(example, torch.Tensor) else None,
        }
        return structured_outcome(ctx, self.space, found.masks, history, len(found.scores), self.reference, extra)

    @staticmethod
    def _scorer(ctx: Context, o: CoarseOptions) -> Callable[[nn.Module], float]:
        if o.score == "evaluate":
            return ctx.score
        if not ctx.val_batches:
            raise ValueError(f"score={o.score!r} computes the metric on validation batches: pass val_data=...")
        metric, batches = get_metric(o.score), DeviceBatches(ctx.val_batches)
        return lambda model: check_score(metric_on_batches(model, batches, metric))


def structured_outcome(ctx: Context, space: CoarseSpace, masks: Masks, history: list, nfev: int,
                       reference: Optional[float], extra: dict[str, Any]) -> Outcome:
    """The outcome of a channel / kernel pruner (``random_coarse``, ``de_channel``): weight masks of every
    Conv2d / Linear the masks touch or the user selected (what sparsity is counted over, docs/ALGORITHMS.md
    section 0), every other mask (biases, BatchNorm terms) beside them."""
    names = [t.name for t in ctx.targets if t.module_type in ("Conv2d", "Linear")]
    names += [n for n in masks if n.endswith(".weight") and isinstance(space.modules[n.rpartition(".")[0]],
                                                                      (nn.Conv2d, nn.Linear)) and n not in names]
    weight_masks = {n: masks[n] if n in masks else torch.ones(space.param(n).shape, dtype=torch.bool) for n in names}
    targets = [Target(*n.rpartition(".")[::2], type(space.modules[n.rpartition(".")[0]]).__name__,
                      tuple(space.param(n).shape)) for n in names]
    return Outcome(masks=weight_masks, targets=targets, history=history, nfev=nfev,
                   accuracy=history[-1]["accuracy_after_finetune"], reference_accuracy=reference, extra_masks=masks,
                   extra=extra)


class CoarseRound(RoundLoop):
    """``random_coarse``'s single round through the shared loop (``start`` / ``step`` / ``finish``)."""

    pruner: RandomCoarse

    def _setup(self, ctx: Context) -> None:
        self.pruner.setup(ctx)

    def _reference(self) -> Optional[float]:
        return self.pruner.reference  # scored once, while the model's input was captured

    def _new_loop(self) -> dict[str, Any]:
        return {"plan": [None], "next": 0, "reference": self.reference, "accuracy": self.reference}

    def _step(self) -> RoundRecord:
        record = RoundRecord(self.pruner.round(self.ctx))
        self.loop.update(next=1, accuracy=record["accuracy_after_finetune"])
        self._bar.update(1)
        return record

    def _outcome(self) -> Outcome:
        return self.pruner.outcome(self.ctx, self.history)


class L1Filter(RandomCoarse):
    """L1-norm filter pruning (Li et al., ICLR 2017): keep the filters (and kernels) of largest
    L1 norm; coupled filters are ranked by the sum of their norms. The baseline of random_coarse."""

    name = "l1_filter"

    def __init__(self, options: Optional[CoarseOptions] = None, **kwargs: Any) -> None:
        if options is None:  # the baseline's own defaults; an Options object given is taken as it is
            kwargs.setdefault("criterion", "l1")
            kwargs.setdefault("adaptive_bn", False)
        super().__init__(options, **kwargs)


@hookimpl
def register_pruners():
    return [RandomCoarse, L1Filter]


__all__ = ["RandomCoarse", "L1Filter", "CoarseOptions", "CoarseSpace", "CoarseSearch", "coarse_search", "InPlaceMasks",
           "recalibrate_bn", "count_macs", "CouplingError"]
