"""Candidate evaluation behind one seam: a round's weights go out once, keep-count vectors go in,
fitness values come back in the same order.

Backends (option ``backend=``, with ``workers=``):

* ``serial``: in this process, on the working copy (masks applied in place, then restored).
* ``batched``: several candidates in one pass with ``torch.func.functional_call`` + ``vmap`` over
  stacked masked weights; needs ``val_data`` batches and a metric; falls back to ``serial`` where
  vmap cannot run the model (logged once).
* ``process``: a local pool of forked workers, each holding one model replica and the cached
  validation data (inherited at fork), receiving only candidate vectors. Linux/macOS (fork).
* ``ray``: the same with one Ray actor per worker (``ray.init()`` locally unless ``ray_address``).

A scorer is any object of the :class:`Scorer` protocol (``model``, ``reset()`` to take the model's
weights as the round's, ``score(candidate, floor)`` and ``restore()``): :class:`MagnitudeScorer`
scores magnitude keep-counts (``de_layerwise``); ``de_plugin.coarse.CoarseScorer`` scores channel /
kernel masks (``random_coarse``); :class:`de_plugin.patterns.PatternScorer` scores INC-style pattern
masks (used by the INC adapter).
Every backend has the :class:`Backend` protocol. This module also owns evaluating a model on
batches (:func:`inference`, :func:`metric_on_batches`, :class:`DeviceBatches`) and
:func:`check_score`, the one place a user's score is checked.

Early rejection (``floors``): each candidate may come with the score it must reach to matter (in
DE, the score that would let a trial beat its parent). Where the score is accuracy on ``val_data``
batches, evaluation stops at the first batch after which even an all-correct remainder cannot reach
that floor, and the candidate comes back as a :class:`Bound` (an upper bound, below its floor)
instead of its exact score. Selection is unchanged, so the masks are the same as without it.

Every worker pins its intra-op threads (``threads_per_worker``, default 1); an evaluation is a pure
function of (weights, counts), so ``serial`` run with the same thread count gives bit-identical
fitness, hence identical masks. A worker that raises is reported with its traceback and the
candidate retried once elsewhere; a worker that dies is replaced once; then the search stops.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import numbers
import os
import re
import socket
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from pydantic import Field

from .allocation import keep_mask, magnitude_rank  # noqa: F401 - the scorer's mask math, re-exported
from .metrics import accuracy
from .options import Options
from .registry import get_metric
from .targets import Target, get_param

log = logging.getLogger("de_plugin")
BACKENDS = ("serial", "batched", "process", "ray")


class WorkerError(RuntimeError):
    """An evaluation worker failed; the message carries its traceback."""


class Bound(float):
    """Upper bound on the score of a candidate rejected early: it is below the candidate's floor, so
    the candidate cannot win; callers must not cache it as the candidate's exact score.
    ``images_left`` is how many validation images the rejection saved."""

    def __new__(cls, value: float, images_left: int = 0) -> "Bound":
        obj = super().__new__(cls, value)
        obj.images_left = int(images_left)
        return obj

    def __reduce__(self):  # pickled across process / Ray workers with its count
        return (Bound, (float(self), self.images_left))


#: how far below its floor a candidate's upper bound must be before it is rejected; covers float32
#: rounding of the metric (accuracy is a float32 mean), so a rejected candidate truly scores < floor
REJECT_MARGIN = 1e-5


def check_score(value: Any) -> float:
    """The user's score as a finite float, or an error that says what came back."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`evaluate` must return a number (accuracy, higher is better), got {type(value).__name__}: {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`evaluate` returned {value}; it must return a finite number (check the model and data)")
    return value


def check_device(name: str) -> torch.device:
    """``torch.device(name)``, refused up front when this machine cannot use it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={name!r} is not a torch device ({exc}); use e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}, but torch has no CUDA on this machine (torch.cuda.is_available() is "
                         "False); drop `device` or use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r}, but MPS is not available on this machine; drop `device` or use 'cpu'")
    return dev


def check_batches(data: Any, name: str, pairs: bool) -> list:
    """``data`` as a list of batches, or an error naming ``name`` and the expected form. With
    ``pairs`` every batch must be ``(inputs, targets)``; else a batch may also be an input tensor."""
    form = "(inputs, targets) batches" if pairs else "batches ((inputs, targets) pairs or input tensors)"
    if isinstance(data, torch.Tensor):
        raise TypeError(f"`{name}` must be an iterable of {form}, e.g. a DataLoader or [(x, y), ...]; got one "
                        f"tensor of shape {tuple(data.shape)}: wrap it as [(x, y)] or split it into batches")
    try:
        batches = list(data)
    except TypeError:
        raise TypeError(f"`{name}` must be an iterable of {form}, got {type(data).__name__}") from None
    if not batches:
        raise ValueError(f"`{name}` is empty")
    for i, b in enumerate(batches):
        ok = isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], torch.Tensor) if pairs else \
            isinstance(b, torch.Tensor) or (isinstance(b, (tuple, list)) and b and isinstance(b[0], torch.Tensor))
        if not ok:
            raise TypeError(f"`{name}` must be an iterable of {form}; batch {i} is {type(b).__name__}"
                            + (f" of length {len(b)}" if isinstance(b, (tuple, list)) else ""))
    return [tuple(b) if isinstance(b, list) else b for b in batches]


@contextmanager
def inference(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the block; the model's train/eval mode comes back afterwards,
    also when the block raises (a user's model must not stay in eval mode after a failed score)."""
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was)


class DeviceBatches:
    """Validation batches kept once per device: moved on first use there, then reused, so no
    candidate pays a host-to-device copy (on CPU the batches are used as given)."""

    def __init__(self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = list(batches)
        self._moved: dict[str, tuple[list, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.batches)

    def on(self, dev: torch.device) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """(batches, all labels concatenated) on ``dev``."""
        key = str(dev)
        if key not in self._moved:
            pin = dev.type == "cuda"
            moved = [(_move(x, dev, pin), _move(y, dev, pin)) for x, y in self.batches]
            self._moved[key] = (moved, torch.cat([y for _, y in moved]))
        return self._moved[key]


def _move(t: Any, dev: torch.device, pin: bool) -> Any:
    if not isinstance(t, torch.Tensor) or t.device == dev:
        return t
    return (t.pin_memory() if pin and t.device.type == "cpu" else t).to(dev, non_blocking=pin)


def metric_on_batches(model: nn.Module, batches: DeviceBatches, metric: Callable) -> float:
    """``metric(outputs, labels)`` of ``model`` over the cached batches (on the model's device)."""
    data, labels = batches.on(next(model.parameters()).device)
    with inference(model):
        if metric is accuracy:  # keep only each batch's predictions: the same value, less memory traffic
            preds = torch.cat([model(x).argmax(1) for x, _ in data])
            return float((preds == labels).float().mean())
        out = torch.cat([model(x) for x, _ in data])
    return metric(out, labels)


def evaluator_from_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                           metric: str | Callable) -> Callable[[nn.Module], float]:
    """Build ``evaluate(model)`` from validation batches and a metric; the batches are cached once
    (per device) and the model is run under ``torch.inference_mode``."""
    cached = DeviceBatches([(x, y) for x, y in batches])
    if not len(cached):
        raise ValueError("`val_data` is empty")
    fn = get_metric(metric) if isinstance(metric, str) else metric

    def evaluate(model: nn.Module) -> float:
        return metric_on_batches(model, cached, fn)

    evaluate.batches = cached  # the scorer's early rejection reads the same device copies
    return evaluate


class Scorer(Protocol):
    """What a backend scores with: one model, candidates applied in place and undone."""

    model: nn.Module

    def reset(self) -> None:
        """Take the model's current weights as the round's reference."""

    def score(self, candidate: Any, floor: Optional[float] = None) -> float:
        """The candidate's score; may be a :class:`Bound` below ``floor`` when it cannot reach it."""

    def restore(self) -> None:
        """Put the round's reference weights back."""


class Backend(Protocol):
    """Where a round's candidates are scored (:func:`make_backend`)."""

    name: str
    scorer: Scorer

    def start_round(self) -> None:
        """The scorer's model holds the round's weights: snapshot them (and ship them to workers)."""

    def evaluate(self, batch: Sequence[Any], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        """Scores of ``batch`` in order."""

    def end_round(self) -> None:
        """The model holds the round's weights again."""

    def close(self) -> None:
        """Stop workers."""


def finish_round(scorer: Scorer) -> None:
    """The round is over: the model holds its weights again and the scorer lets go of what it held
    per weight for the round (the snapshot, the ranks), so fine-tuning does not carry them."""
    scorer.restore()
    release = getattr(scorer, "release", None)
    if release is not None:
        release()


@contextmanager
def backend_round(backend: Backend) -> Iterator[Scorer]:
    """One round on ``backend``: the model's weights are the round's inside, and again after."""
    backend.start_round()
    try:
        yield backend.scorer
    finally:
        backend.end_round()


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_norms(model: nn.Module) -> list[nn.Module]:
    """The model's BatchNorm layers (what adaptive BN re-estimates)."""
    return [m for m in model.modules() if isinstance(m, BN_TYPES)]


def recalibrate_bn(model: nn.Module, batches: Sequence[Any], num_batches: int) -> None:
    """EagleEye's adaptive BN: reset BatchNorm statistics and re-estimate them (cumulative average)
    from ``num_batches`` training batches, in train mode for BN only, without gradients."""
    bns = batch_norms(model)
    if not bns:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = [bn.momentum for bn in bns]
    dev = next(model.parameters()).device
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        with torch.no_grad():
            for b in list(batches)[:num_batches]:
                x = b[0] if isinstance(b, (tuple, list)) else b
                model(x.to(dev))
    finally:
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        for m, t in modes.items():
            m.train(t)


class BNState:
    """The model's BatchNorm running statistics, saved once and put back after every candidate
    scored with adaptive BN (the user's statistics are never left re-estimated)."""

    def __init__(self, model: nn.Module):
        self.bns = batch_norms(model)
        self.saved = [{k: v.clone() for k, v in bn.state_dict().items() if not k.endswith(("weight", "bias"))}
                      for bn in self.bns]

    def restore(self) -> None:
        with torch.no_grad():
            for bn, saved in zip(self.bns, self.saved):
                for k, v in saved.items():
                    getattr(bn, k).copy_(v)


#: ``low_memory=None`` turns the low-memory search on above this many searched weights (the int32
#: ranks alone would hold 200 MB there)
LOW_MEMORY_AUTO = 50_000_000


def low_memory_for(option: Optional[bool], targets: Sequence[Target]) -> bool:
    """Whether a search over ``targets`` runs in low-memory mode: the option, or by size when None."""
    return bool(option) if option is not None else sum(t.numel for t in targets) > LOW_MEMORY_AUTO


class MagnitudeScorer:
    """Magnitude masks from keep-counts, applied in place to one model and scored.

    Per searched weight it holds the round's fp32 snapshot and, unless ``low_memory``, an int32
    magnitude rank (masks by one comparison). ``low_memory`` drops the ranks (masks by an O(n)
    selection per changed layer, :func:`keep_mask`: the same masks) and takes the snapshot at the
    first candidate rather than at the round's start, so the round's seeds (LAMP's scores) are not
    held at the same time."""

    def __init__(self, model: nn.Module, targets: Sequence[Target], evaluate: Callable[[nn.Module], float],
                 batches: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
                 metric: Optional[Callable] = None, calib: Optional[Sequence[Any]] = None, bn_batches: int = 0,
                 search_batches: Optional[int] = None, low_memory: bool = False):
        self.model, self.targets, self.evaluate = model, list(targets), evaluate
        self.low_memory = low_memory
        self._w0: Optional[list[torch.Tensor]] = None
        self._scratch: Optional[torch.Tensor] = None
        self._ready = False
        # multi-fidelity: the search scores accuracy on the first ``search_batches`` batches only
        # (needs ``batches``); :meth:`score_full` gives the full score for the final re-scoring
        self.search_batches = search_batches
        # adaptive BN: re-estimate BatchNorm statistics on ``bn_batches`` of ``calib`` before scoring
        self.calib = list(calib)[:bn_batches] if calib is not None and bn_batches > 0 else None
        self.bn_state: Optional[BNState] = None
        # early rejection needs a score that is a per-image sum: accuracy on the cached batches
        # (``evaluate`` is then ``evaluator_from_batches(batches, accuracy)``, which this mirrors)
        self.batches = None
        if batches is not None and metric is accuracy and len(batches) > 1:
            shared = getattr(evaluate, "batches", None)  # the evaluator's own (device) copies
            self.batches = shared if isinstance(shared, DeviceBatches) else DeviceBatches(batches)
        self.metric = metric
        self.rank: Optional[list[torch.Tensor]] = None  # built by reset(), once per round

    def reset(self) -> None:
        """Take the model's current weights as this round's reference: a snapshot and each weight's
        magnitude rank (built once per round, shared with the round's mask computation); in
        low-memory mode no ranks, and the snapshot waits for the first candidate (:attr:`w0`)."""
        self.params = [get_param(self.model, t) for t in self.targets]
        self._w0 = None if self.low_memory else [p.detach().clone() for p in self.params]
        self.rank = None if self.low_memory else [magnitude_rank(w) for w in self._w0]
        self._keep = torch.empty(max(p.numel() for p in self.params), dtype=torch.bool, device=self.params[0].device)
        # keep_mask's two work buffers (low-memory mode), 8 bytes per weight of the largest layer: held only
        # when that layer is under a tenth of the searched weights (else they would weigh on the peak)
        big = self._keep.numel()
        self._scratch = torch.empty(2 * big, device=self.params[0].device, dtype=self.params[0].dtype) \
            if self.low_memory and 10 * big < sum(p.numel() for p in self.params) else None
        self.applied: list[Optional[int]] = [None] * len(self.params)
        self.bn_state = BNState(self.model) if self.calib else None
        self._ready = True

    @property
    def w0(self) -> list[torch.Tensor]:
        """The round's weights (in low-memory mode taken at first use, before any mask is applied)."""
        if not self._ready:
            self.reset()
        if self._w0 is None:
            self._w0 = [p.detach().clone() for p in self.params]
        return self._w0

    def apply(self, counts: Sequence[int]) -> None:
        """Keep the ``counts[l]`` largest weights of each layer: one vectorised pass per changed layer
        (``rank < k``, or :func:`keep_mask` in low-memory mode), exactly the first ``k`` of the stable
        descending magnitude order."""
        w0 = self.w0
        with torch.no_grad():
            for i, (p, k) in enumerate(zip(self.params, counts)):
                k = int(k)
                if self.applied[i] != k:
                    keep = self._keep[: p.numel()].view(p.shape)  # one bool buffer, reused by every layer
                    if self.rank is None:
                        keep_mask(w0[i], k, out=keep, scratch=self._scratch)
                    else:
                        torch.lt(self.rank[i], k, out=keep)
                    torch.mul(w0[i], keep, out=p)
                    self.applied[i] = k

    def restore(self) -> None:
        if not self._ready:
            return
        with torch.no_grad():
            for p, w in zip(self.params, self._w0 or []):
                p.copy_(w)
        self.applied = [None] * len(self.params)
        if self.bn_state is not None:
            self.bn_state.restore()

    def release(self) -> None:
        """Drop the round's snapshot and ranks (taken again by the next :meth:`reset` or candidate)."""
        self._w0, self.rank, self._scratch, self._ready = None, None, None, False

    def _prepare(self, counts: Sequence[int]) -> None:
        """The candidate's masks applied and, with adaptive BN, its BatchNorm statistics re-estimated."""
        self.apply(counts)
        if self.bn_state is not None:
            recalibrate_bn(self.model, self.calib, len(self.calib))

    def score(self, counts: Sequence[int], floor: Optional[float] = None) -> float:
        """The candidate's score, or a :class:`Bound` below ``floor`` when it cannot reach it."""
        self._prepare(counts)
        if self.search_batches is not None and self.batches is not None:
            return self._bounded(floor if floor is not None and np.isfinite(floor) else -math.inf, self.search_batches)
        if floor is None or self.batches is None or not np.isfinite(floor):
            return check_score(self.evaluate(self.model))
        return self._bounded(floor)

    def score_full(self, counts: Sequence[int]) -> float:
        """The candidate's exact score on all of the validation data (the multi-fidelity re-score)."""
        self._prepare(counts)
        return check_score(self.evaluate(self.model))

    def score_holdout(self, counts: Sequence[int]) -> float:
        """The candidate's accuracy on the validation batches the search did not score on (those after
        the first ``search_batches``); all of them when the search scored on all."""
        self._prepare(counts)
        return self.holdout_now()

    def holdout_now(self) -> float:
        """The model's accuracy as it is now on the held-out validation batches (all when none are held out)."""
        if self.batches is None or self.search_batches is None or self.search_batches >= len(self.batches):
            return check_score(self.evaluate(self.model))
        data, labels = self.batches.on(next(self.model.parameters()).device)
        held = data[self.search_batches:]
        with inference(self.model):
            preds = torch.cat([self.model(x).argmax(1) for x, _ in held])
        return float((preds == labels[len(labels) - len(preds):]).float().mean())

    def _bounded(self, floor: float, n_batches: Optional[int] = None) -> float:
        """Accuracy batch by batch (over the first ``n_batches``, all by default); stop once
        ``(correct so far + images left) / total < floor``. A candidate that is not rejected gets
        exactly what ``evaluate`` computes on those batches (same predictions, the same float32 mean),
        so serial, worker and rejecting runs stay bit-identical."""
        model = self.model
        data, labels = self.batches.on(next(model.parameters()).device)
        if n_batches is not None:
            data = data[:n_batches]
            labels = labels[: sum(len(y) for _, y in data)]
        total = len(labels)
        preds, seen, correct = [], 0, 0
        with inference(model):
            for x, y in data:
                pred = model(x).argmax(1)
                preds.append(pred)
                seen += len(y)
                correct += int((pred == y).sum())
                upper = (correct + total - seen) / total
                if seen < total and upper < floor - REJECT_MARGIN:
                    return Bound(upper, total - seen)
        return check_score(float((torch.cat(preds) == labels).float().mean()))  # exactly metrics.accuracy


# ---------------------------------------------------------------------------------------- serial
class SerialBackend:
    name = "serial"

    def __init__(self, scorer: Scorer):
        self.scorer = scorer

    def start_round(self) -> None:
        self.scorer.reset()

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        """Scores of ``batch`` in order; with ``floors``, candidates may come back as :class:`Bound`."""
        floors = floors if floors is not None else [None] * len(batch)
        try:
            return [self.scorer.score(c, f) for c, f in zip(batch, floors)]
        finally:  # between batches the model holds the round's weights, as with remote workers
            self.scorer.restore()

    def end_round(self) -> None:
        finish_round(self.scorer)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------- batched
class BatchedBackend(SerialBackend):
    """K candidates per forward: the targets' masked weights stacked on a leading dim and vmapped."""

    name = "batched"

    def __init__(self, scorer: MagnitudeScorer, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], metric: Callable,
                 chunk: int = 8):
        super().__init__(scorer)
        self.xs = [b[0] for b in batches]
        self.y = torch.cat([b[1] for b in batches])
        self.metric, self.chunk = metric, chunk
        self.fallback = False

    def _forward(self, stacked: dict[str, torch.Tensor]) -> torch.Tensor:
        from torch.func import functional_call, vmap

        model = self.scorer.model
        dev = next(model.parameters()).device
        outs = []
        for x in self.xs:
            x = x.to(dev)
            outs.append(vmap(lambda p: functional_call(model, p, (x,)))(stacked))
        return torch.cat(outs, dim=1)  # [K, N, classes]

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        """Exact scores (a vmapped chunk runs every batch, so ``floors`` only apply after a fallback)."""
        if self.fallback:
            return SerialBackend.evaluate(self, batch, floors)
        s = self.scorer
        names = [f"{t.module_name}.{t.param_name}" if t.module_name else t.param_name for t in s.targets]
        if any(n not in dict(s.model.named_parameters()) for n in names):
            self.fallback = True  # masks attached as _orig parameters: not a plain functional_call
            return SerialBackend.evaluate(self, batch, floors)
        out: list[float] = []
        was = s.model.training
        s.model.eval()
        try:
            for start in range(0, len(batch), self.chunk):
                part = batch[start:start + self.chunk]
                stacked = {}
                with torch.no_grad():
                    for li, (name, w0) in enumerate(zip(names, s.w0)):
                        if s.rank is None:  # low-memory mode: one selection per candidate and layer
                            mask = torch.stack([keep_mask(w0, int(c[li])) for c in part])
                        else:
                            rank = s.rank[li]
                            keep = torch.tensor([int(c[li]) for c in part], device=rank.device)
                            mask = rank.unsqueeze(0) < keep.view(-1, *([1] * rank.dim()))
                        stacked[name] = torch.where(mask, w0.unsqueeze(0), torch.zeros((), dtype=w0.dtype))
                with torch.inference_mode():
                    logits = self._forward(stacked)
                out += [check_score(self.metric(logits[j], self.y.to(logits.device))) for j in range(len(part))]
        except Exception as exc:  # noqa: BLE001 - vmap cannot run every model; serial always can
            log.warning("batched evaluation is not possible for this model (%s); using serial", exc)
            self.fallback = True
            return out + SerialBackend.evaluate(self, batch[len(out):], None if floors is None else floors[len(out):])
        finally:
            s.model.train(was)
        return out


# --------------------------------------------------------------------------------------- process
_PAYLOAD: Any = None  # the scorer, inherited by forked workers


def _plain(v: Any) -> float:
    return v if isinstance(v, Bound) else float(v)


def _worker_main(conn, threads: int) -> None:
    torch.set_num_threads(threads)
    scorer = _PAYLOAD  # the parent's scorer, inherited at fork: a model replica and cached data
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        kind = msg[0]
        try:
            if kind == "round":
                scorer.model.load_state_dict(msg[1])
                scorer.reset()
                conn.send(("ok", None))
            elif kind == "eval":
                conn.send(("ok", scorer.score(msg[1], msg[2])))
            elif kind == "stop":
                return
        except Exception:  # noqa: BLE001 - report everything to the parent
            conn.send(("error", traceback.format_exc()))


class ProcessBackend:
    """Forked local workers; each receives the round's weights once, then only count vectors."""

    name = "process"

    def __init__(self, scorer: Scorer, workers: int, threads: int):
        if "fork" not in mp.get_all_start_methods():
            raise RuntimeError("backend='process' needs the fork start method (Linux/macOS); use 'ray' instead")
        self.scorer, self.n, self.threads = scorer, workers, threads
        self.ctx = mp.get_context("fork")
        self.workers: list[tuple[Any, Any]] = []
        self.round_state: Optional[dict] = None
        for _ in range(workers):
            self.workers.append(self._spawn())

    def _spawn(self):
        global _PAYLOAD
        _PAYLOAD = self.scorer
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child, self.threads), daemon=True)
        proc.start()
        child.close()
        _PAYLOAD = None
        if self.round_state is not None:
            parent.send(("round", self.round_state))
            self._reply(parent, proc)
        return parent, proc

    def _reply(self, conn, proc):
        try:
            if not conn.poll(None):
                raise EOFError
            status, value = conn.recv()
        except (EOFError, ConnectionError, OSError):
            raise WorkerError(f"evaluation worker pid {proc.pid} died (exit code {proc.exitcode})") from None
        if status == "error":
            raise WorkerError(f"evaluation worker pid {proc.pid} raised:\n{value}")
        return value

    def start_round(self) -> None:
        self.scorer.reset()
        self.round_state = {k: v.detach().cpu().clone() for k, v in self.scorer.model.state_dict().items()}
        for conn, proc in self.workers:
            conn.send(("round", self.round_state))
        for conn, proc in self.workers:
            self._reply(conn, proc)

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        floors = floors if floors is not None else [None] * len(batch)
        out: list[Optional[float]] = [None] * len(batch)
        pending = list(range(len(batch)))
        retries: dict[int, int] = {}
        while pending:
            busy = []
            for w, idx in zip(range(len(self.workers)), pending[: len(self.workers)]):
                conn, proc = self.workers[w]
                try:
                    conn.send(("eval", batch[idx], floors[idx]))
                except (BrokenPipeError, OSError):
                    pass  # reported by _reply below
                busy.append((w, idx))
            pending = pending[len(busy):]
            for w, idx in busy:
                conn, proc = self.workers[w]
                try:
                    out[idx] = self._reply(conn, proc)
                except WorkerError as exc:
                    retries[idx] = retries.get(idx, 0) + 1
                    log.warning("%s; candidate %d %s", exc, idx, "retried" if retries[idx] <= 1 else "failed twice")
                    if retries[idx] > 1:
                        raise
                    if not proc.is_alive():
                        self.workers[w] = self._spawn()
                    pending.insert(0, idx)
        return [_plain(v) for v in out]

    def end_round(self) -> None:
        finish_round(self.scorer)
        self.round_state = None  # a copy of the model: only needed to restart a worker mid-round

    def close(self) -> None:
        for conn, proc in self.workers:
            try:
                conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.workers = []


# ------------------------------------------------------------------------------------------- ray
def _ray_init(ray: Any, address: Optional[str], runtime_env: Optional[dict], cpus: int, timeout: float) -> None:
    """``ray.init`` for a local Ray or a cluster; an address nobody answers at, or a cluster running
    another Ray, is said in plain words instead of a hang or Ray's internals."""
    if not address:
        ray.init(num_cpus=max(cpus, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env=runtime_env)
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        raise ConnectionError(f"no Ray cluster answered at ray_address={address!r} within {timeout:.0f} s: start one "
                              "there (ray start --head --port <port>) or fix the address (host:port of the head node, "
                              "or ray://host:10001 for Ray Client)") from None
    try:
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
    except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError / ConnectionError with its own text
        if "version" in str(exc).lower() and "mismatch" in str(exc).lower():
            raise RuntimeError(f"the Ray cluster at {address} runs another Ray or Python version than this process "
                               f"(Ray {ray.__version__} here); install the cluster's Ray here, or start the cluster "
                               f"with this one. Ray said: {str(exc).splitlines()[0]}") from None
        raise


def _ray_actor(ray: Any, threads: int, gpu: bool) -> Any:
    """The worker actor class: one per GPU when the model is on CUDA, else ``threads`` CPUs each."""

    @ray.remote(num_cpus=0 if gpu else threads, num_gpus=1 if gpu else 0)
    class _Actor:
        def __init__(self, scorer, threads):
            torch.set_num_threads(threads)
            self.scorer = scorer

        def where(self):
            ctx = ray.get_runtime_context()
            return socket.gethostname(), ctx.get_node_id(), list(ctx.get_accelerator_ids().get("GPU", []))

        def start_round(self, state):
            self.scorer.model.load_state_dict(state)
            self.scorer.reset()

        def score(self, candidate, floor):
            return self.scorer.score(candidate, floor)

    return _Actor


class RayBackend:
    """One Ray actor per worker, each with a model replica; candidate vectors are the only traffic
    besides the round's weights (``ray.put`` once per round).

    Without ``address`` a local Ray starts in this process; with one (``"127.0.0.1:6379"`` from
    ``ray start --head``, or ``"ray://host:10001"``) the actors run on that cluster's nodes, one per GPU
    when the model is on CUDA, else one per ``threads`` CPUs. ``runtime_env`` goes to ``ray.init``: the
    cluster's workers import the model's class and the scoring code, so code that is not installed on
    the nodes travels as ``{"py_modules": [...]}`` or ``{"working_dir": "."}``."""

    name = "ray"
    CONNECT_TIMEOUT = 5.0  # seconds for a cluster to answer at ray_address before we say none did

    def __init__(self, scorer: Scorer, workers: int, threads: int, address: Optional[str] = None,
                 runtime_env: Optional[dict] = None):
        try:
            import ray
        except ImportError:
            raise ImportError("backend='ray' needs Ray: pip install 'de-plugin[ray]' (or pip install ray)") from None
        self.ray, self.scorer = ray, scorer
        gpu = any(p.is_cuda for p in scorer.model.parameters())
        if not ray.is_initialized():
            _ray_init(ray, address, runtime_env, workers * threads, self.CONNECT_TIMEOUT)
        elif address or runtime_env:
            log.warning("Ray is already initialised in this process (%s): ray_address / ray_runtime_env are not "
                        "applied; call ray.shutdown() first to join another cluster",
                        ray.get_runtime_context().gcs_address)
        if gpu and ray.cluster_resources().get("GPU", 0) < 1:
            raise ValueError("the model is on CUDA but the Ray cluster has no GPU (ray.cluster_resources() lists "
                             "none): start its nodes with GPUs (ray start --num-gpus N) or search on the CPU")
        payload = ray.put(scorer)  # model replica, cached data and scoring code, shipped once
        actor = _ray_actor(ray, threads, gpu).options(scheduling_strategy="SPREAD")  # over the nodes
        self.actors = [actor.remote(payload, threads) for _ in range(workers)]
        self.placement = self._where()

    def _where(self) -> dict:
        """Which node each worker runs on (and says so in the log and the result); an actor that cannot
        unpickle the model (its class not importable on the node) fails here, before any search."""
        where, alive, error = [], [], None
        for a in self.actors:
            try:
                where.append(self.ray.get(a.where.remote()))
                alive.append(a)
            except self.ray.exceptions.RayActorError as exc:  # its node died, or it cannot unpickle the model
                error = exc
                if "No module named" not in str(exc):
                    log.warning("ray: a worker died at start (%s); going on without it", str(exc).splitlines()[0])
        self.actors = alive
        if error is not None and (not alive or "No module named" in str(error)):
            exc = error
            self.close()
            missing = re.search(r"No module named '([^']+)'", str(exc))
            if missing:
                raise ImportError(
                    f"the Ray workers cannot import {missing.group(1)!r}, which the model or scoring code comes from: "
                    f"ship it with ray_runtime_env={{'py_modules': ['path/to/{missing.group(1).split('.')[0]}']}} "
                    "(a module file or package directory), or {'working_dir': '.'} to send the current directory, "
                    "or install it on every node") from None
            raise exc
        nodes: dict[str, int] = {}
        for host, node, _gpus in where:
            key = f"{host}/{node[:8]}"
            nodes[key] = nodes.get(key, 0) + 1
        log.info("ray: %d workers on %d node(s): %s%s", len(where), len(nodes),
                 ", ".join(f"{h} ({n})" for h, n in nodes.items()),
                 "; GPUs " + ", ".join(str(g) for *_, g in where) if any(g for *_, g in where) else "")
        return {"workers": len(where), "nodes": nodes, "gpus": [g for *_, g in where]}

    def start_round(self) -> None:
        self.scorer.reset()
        state = self.ray.put({k: v.detach().cpu().clone() for k, v in self.scorer.model.state_dict().items()})
        futures = [(a, a.start_round.remote(state)) for a in self.actors]
        for a, f in futures:
            try:
                self.ray.get(f)
            except self.ray.exceptions.RayActorError as exc:  # its node died between rounds
                if len(self.actors) == 1:
                    raise WorkerError(f"the last Ray worker died: {exc}") from exc
                log.warning("ray: a worker died (%s); going on without it", str(exc).splitlines()[0])
                self.actors.remove(a)
                self.placement["workers"] = len(self.actors)

    def evaluate(self, batch: Sequence[np.ndarray], floors: Optional[Sequence[Optional[float]]] = None) -> list[float]:
        floors = floors if floors is not None else [None] * len(batch)
        sent = [(self.actors[i % len(self.actors)], c, fl) for i, (c, fl) in enumerate(zip(batch, floors))]
        futures = [a.score.remote(c, fl) for a, c, fl in sent]
        out = []
        for i, f in enumerate(futures):
            try:
                out.append(_plain(self.ray.get(f)))
            except Exception as exc:  # noqa: BLE001 - Ray wraps the worker's exception
                out.append(self._retry(sent[i], i, exc))
        return out

    def _retry(self, sent: tuple, i: int, exc: Exception) -> float:
        """A candidate whose worker failed: a dead worker (its node gone) leaves the pool and the candidate
        goes to the next live one; any other failure is retried once elsewhere. Scores do not depend on
        the worker, so the search goes on exactly as it would have."""
        actor, candidate, floor = sent
        dead = isinstance(exc, self.ray.exceptions.RayActorError)
        log.warning("ray worker failed on candidate %d (%s); %s", i, str(exc).splitlines()[0][:200],
                    "dropping it, retrying on another worker" if dead else "retrying once")
        tries = len(self.actors) if dead else 1
        for _ in range(tries):
            if dead and actor in self.actors and len(self.actors) > 1:
                self.actors.remove(actor)
                self.placement["workers"] = len(self.actors)
            others = [a for a in self.actors if a is not actor] or self.actors
            actor = others[i % len(others)]
            try:
                return _plain(self.ray.get(actor.score.remote(candidate, floor)))
            except Exception as exc2:  # noqa: BLE001
                exc, dead = exc2, isinstance(exc2, self.ray.exceptions.RayActorError)
        raise WorkerError(f"ray evaluation failed on every worker tried: {exc}") from exc

    def end_round(self) -> None:
        finish_round(self.scorer)

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


class BackendOptions(Options):
    """Where candidates are scored; shared by the pruners that score many candidates."""

    backend: Literal["serial", "batched", "process", "ray"] = Field(
        "serial", description="where candidates are evaluated (de_plugin.evaluation)")
    workers: int = Field(1, ge=1, description="process / ray: evaluation workers")
    threads_per_worker: int = Field(1, ge=1, description="process / ray: intra-op threads pinned in each worker")
    ray_address: Optional[str] = Field(None, description="ray: join this cluster instead of starting a local one")
    ray_runtime_env: Optional[dict] = Field(None, description="ray: runtime_env for ray.init, e.g. {'py_modules': "
                                            "['mymodels.py']} when the model's class is not installed on the nodes")


def make_backend(name: str, scorer: Any, workers: int = 1, threads: int = 1, address: Optional[str] = None,
                 val_batches: Optional[list] = None, metric: Optional[Callable] = None,
                 runtime_env: Optional[dict] = None):
    """The evaluation backend named ``name`` (see the module docstring)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if name == "serial":
        return SerialBackend(scorer)
    if name == "batched":
        if not isinstance(scorer, MagnitudeScorer):
            raise ValueError(f"backend='batched' stacks magnitude-masked weights and is not available for "
                             f"{type(scorer).__name__}; use 'serial', 'process' or 'ray'")
        if not val_batches or metric is None:
            log.warning("backend='batched' needs val_data batches and a metric name; using serial")
            return SerialBackend(scorer)
        if scorer.calib:
            log.warning("backend='batched' cannot re-estimate BatchNorm per candidate (adaptive BN); using serial")
            return SerialBackend(scorer)
        return BatchedBackend(scorer, val_batches, metric)
    if name == "process":
        return ProcessBackend(scorer, workers, threads)
    return RayBackend(scorer, workers, threads, address, runtime_env)
