"""Rounds of keep-count pruners: the pruner decides per-layer keep-counts (:meth:`IterativePruner.allocate`
/ ``propose``); :class:`RoundRunner` (a :class:`~de_plugin.runner.RoundLoop`) owns the rest: the budget,
the schedule, magnitude masks, fine-tuning with recovery, accept / roll back, the history and checkpoints.

Three modes, fixed by the context's goal:

* budget (``sparsity=s``): ``rounds`` steps whose densities fall geometrically to ``1 - s``;
* accuracy (``max_accuracy_drop=d``): each step proposes a sparser allocation and keeps it only if
  accuracy after fine-tuning is still >= reference - d; a rejected step is rolled back, and the run
  ends after ``rounds`` accepted steps or ``patience`` rejections in a row;
* scheduled (neither): the caller gives each step's sparsity; the runner never finishes by itself.

``de_layerwise`` and the search-free baselines (uniform, global magnitude, LAMP, ERK) are such
pruners, and so are third-party ones (``tests/test_plugins.py``): subclass :class:`IterativePruner`
and implement ``allocate``. Sharing the runner is what makes comparisons fair: every method gets the
same sparsity schedule and fine-tune epochs per round, and, given the same ``recovery`` option, the
same recovery; only the per-layer allocation differs. The defaults differ: ``de_layerwise`` recovers
by ``splicing``, the baselines by ``none``, so a fair comparison sets ``recovery`` on both (the
benchmarks do).
"""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Optional

import numpy as np
import torch
from pydantic import Field, field_validator

from ..options import Options
from ..pruner import Context, Pruner
from ..result import Outcome
from ..runner import Checkpointer, RoundLoop, RoundRecord
from ..targets import get_param
from .recovery import finetune_round

log = logging.getLogger("de_plugin")


class State:
    """Where the loop stands: current keep-counts and sizes of the targets."""

    def __init__(self, ctx: Context, keep_values: bool = False):
        self.ctx = ctx
        self.numels = np.array([t.numel for t in ctx.targets], dtype=np.int64)
        self.masks = {t.name: get_param(ctx.model, t).detach() != 0 for t in ctx.targets}
        self.counts = np.array([int(torch.count_nonzero(self.masks[t.name])) for t in ctx.targets], dtype=np.int64)
        #: last non-zero value of every weight, only for random recovery with recovery_init="old"
        #: (a copy of every weight: not kept otherwise)
        self.keep_values = keep_values
        self.last_values = {t.name: get_param(ctx.model, t).detach().clone() for t in ctx.targets} if keep_values else {}

    @property
    def total(self) -> int:
        return int(self.numels.sum())

    @property
    def density(self) -> float:
        return float(self.counts.sum()) / self.total

    def weights(self) -> list[torch.Tensor]:
        return [get_param(self.ctx.model, t).detach() for t in self.ctx.targets]

    def min_keep(self, max_layer_sparsity: float) -> np.ndarray:
        return np.minimum(np.ceil(self.numels * (1.0 - max_layer_sparsity)).astype(np.int64), self.numels)

    def max_keep(self, min_layer_sparsity: float) -> np.ndarray:
        """Upper bound of each layer's keep-count: never more than now, nor above 1 - min sparsity."""
        cap = np.floor(self.numels * (1.0 - min_layer_sparsity) + 1e-9).astype(np.int64)
        return np.minimum(self.counts, cap)

    def remember_values(self) -> None:
        if not self.keep_values:
            return
        for t, w in zip(self.ctx.targets, self.weights()):
            nz = w != 0
            self.last_values[t.name][nz] = w[nz]


def density_schedule(start: float, end: float, rounds: int) -> list[float]:
    """Geometric steps in density (equal compression factor per round)."""
    if end >= start:
        return [end]
    return [float(start * (end / start) ** ((i + 1) / rounds)) for i in range(rounds)]


class RoundRunner(RoundLoop):
    """Drives an :class:`IterativePruner` one round at a time (per-layer keep-counts, magnitude masks,
    fine-tuning with recovery) in the budget, accuracy or scheduled mode."""

    pruner: "IterativePruner"

    def _setup(self, ctx: Context) -> None:
        o = self.pruner.options
        self.keep_values = o.recovery == "random" and o.recovery_init == "old"
        self.state = State(ctx, self.keep_values)
        self.mode = "budget" if ctx.sparsity is not None else "accuracy" if ctx.max_accuracy_drop is not None \
            else "scheduled"
        if self.mode == "budget":
            self._check_budget()

    def _begin(self) -> None:
        if self.mode == "accuracy" and self.reference > 1.0:
            raise ValueError(f"`evaluate` returned {self.reference} (above 1) while max_accuracy_drop="
                             f"{self.ctx.max_accuracy_drop} is a fraction of accuracy (0.01 = 1 point): make `evaluate` "
                             f"return accuracy as a fraction (e.g. 0.88, not 88.0)")
        self.pruner.begin(self.ctx, self.reference)

    def _progress_total(self) -> tuple[Optional[int], int]:
        if self.mode == "scheduled":
            return 0, 0
        if self.mode == "budget":
            return super()._progress_total()
        return self.pruner.options.rounds, self.loop["accepted"]  # accuracy form: None unless set

    def _check_budget(self) -> None:
        """Everything wrong with a sparsity goal that needs no evaluation, raised first."""
        ctx, o, state = self.ctx, self.pruner.options, self.state
        self.keep_final = int(round(state.total * (1.0 - ctx.sparsity)))
        if self.keep_final < int(state.min_keep(o.max_layer_sparsity).sum()):
            raise ValueError(f"sparsity {ctx.sparsity} needs some layer above max_layer_sparsity={o.max_layer_sparsity}; "
                             "raise max_layer_sparsity or lower sparsity")
        if o.min_layer_sparsity > o.max_layer_sparsity:
            raise ValueError("min_layer_sparsity must not exceed max_layer_sparsity")
        if self.keep_final > int(state.max_keep(o.min_layer_sparsity).sum()):
            if self.keep_final <= int(state.counts.sum()):
                raise ValueError(f"sparsity {ctx.sparsity} is below min_layer_sparsity={o.min_layer_sparsity}; "
                                 "lower min_layer_sparsity or raise sparsity")
            raise ValueError(f"the selected layers are already {1 - state.density:.4f} sparse, more than the requested "
                             f"sparsity={ctx.sparsity}; ask for a higher sparsity")

    def _new_loop(self) -> dict[str, Any]:
        plan = density_schedule(self.state.density, 1.0 - self.ctx.sparsity, self.pruner.options.budget_rounds()) \
            if self.mode == "budget" else []
        return {"plan": plan, "next": 0, "accepted": 0, "caution": 0, "reference": self.reference,
                "accuracy": self.reference}

    def _state(self) -> dict[str, Any]:
        s = self.state
        return {"counts": s.counts.copy(), "masks": {k: v.cpu().clone() for k, v in s.masks.items()},
                "last_values": {k: v.cpu().clone() for k, v in s.last_values.items()}}

    def _load_state(self, data: dict[str, Any]) -> None:
        self.state.counts, self.state.masks = data["counts"].copy(), dict(data["masks"])
        self.state.last_values = dict(data["last_values"])

    # ------------------------------------------------------------------ steps
    @property
    def done(self) -> bool:
        o, loop = self.pruner.options, self.loop
        if self.mode == "budget":
            return loop["next"] >= len(loop["plan"])
        if self.mode == "accuracy":
            return loop["accepted"] >= o.accuracy_rounds() or loop["caution"] >= o.patience
        return False

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.state.masks

    def step(self, target_sparsity: Optional[float] = None) -> RoundRecord:
        """One round: allocate, prune, fine-tune (with recovery); in the accuracy form accept or roll
        back. ``target_sparsity`` is for schedules owned by the caller (the runner's own plan otherwise)."""
        if target_sparsity is not None:
            record = self._scheduled_step(float(target_sparsity))
            self.history.append(record)
            return record
        if self.mode == "scheduled":
            raise ValueError("this run has no goal of its own (no sparsity / max_accuracy_drop): "
                             "call step(target_sparsity=...)")
        return super().step()

    def _step(self) -> RoundRecord:
        return self._budget_step() if self.mode == "budget" else self._accuracy_step()

    def _budget_step(self) -> RoundRecord:
        o, state, loop = self.pruner.options, self.state, self.loop
        i = loop["next"]
        keep = self.keep_final if i == len(loop["plan"]) - 1 else int(round(state.total * loop["plan"][i]))
        keep = min(keep, int(state.max_keep(o.min_layer_sparsity).sum()))  # min_layer_sparsity first
        t0 = time.perf_counter()
        counts, info = self.pruner.allocate(state, keep, i)
        info = {"target_sparsity": 1.0 - keep / state.total, "search_seconds": time.perf_counter() - t0, **info}
        record = self._prune_and_finetune(i, counts, info)
        loop["accuracy"] = record["accuracy_after_finetune"]
        loop["next"] = i + 1
        self._bar.update(1)
        return record

    def _accuracy_step(self) -> RoundRecord:
        ctx, state, loop = self.ctx, self.state, self.loop
        i = loop["next"]
        loop["next"] = i + 1
        snapshot = (copy.deepcopy(ctx.model.state_dict()), state.counts.copy(), state.masks)
        t0 = time.perf_counter()
        counts, info = self.pruner.propose(state, i, loop["caution"])
        info = {"search_seconds": time.perf_counter() - t0, **info}
        if int(np.sum(counts)) >= int(state.counts.sum()):
            loop["caution"] += 1
            return RoundRecord(round=i, **info, accepted=False, reason="no sparser feasible allocation found")
        record = self._prune_and_finetune(i, counts, info)
        limit = loop["reference"] - ctx.max_accuracy_drop
        record["accepted"] = record["accuracy_after_finetune"] >= limit
        if record["accepted"]:
            loop["accepted"], loop["caution"] = loop["accepted"] + 1, 0
            loop["accuracy"] = record["accuracy_after_finetune"]
            self._bar.update(1)
        else:
            ctx.model.load_state_dict(snapshot[0])
            state.counts, state.masks = snapshot[1], snapshot[2]
            loop["caution"] += 1
            log.info("round %d rejected (%.4f < %.4f): rolled back", i, record["accuracy_after_finetune"], limit)
        return record

    def _scheduled_step(self, sparsity: float) -> RoundRecord:
        """A step at a sparsity the caller's schedule chose, over the weights as they are now (the
        schedule trains between steps): re-allocate, prune; fine-tune only if a ``finetune`` was given."""
        o, ctx = self.pruner.options, self.ctx
        self.state = state = State(ctx, self.keep_values)  # the schedule's training moved the weights
        i = self.loop["next"]
        self.loop["next"] = i + 1
        keep = int(round(state.total * (1.0 - sparsity)))
        keep = max(keep, int(state.min_keep(o.max_layer_sparsity).sum()))
        keep = min(keep, int(state.counts.sum()), int(state.max_keep(o.min_layer_sparsity).sum()))
        info: dict[str, Any] = {"target_sparsity": sparsity}
        counts = state.counts
        if keep < int(state.counts.sum()):
            counts, found = self.pruner.allocate(state, keep, i)
            info.update(found)
        return self._prune_and_finetune(i, counts, info, evaluate=ctx.finetune is not None)

    def _prune_and_finetune(self, i: int, counts: np.ndarray, info: dict[str, Any],
                            evaluate: bool = True) -> RoundRecord:
        o, ctx, state = self.pruner.options, self.ctx, self.state
        t0 = time.perf_counter()
        state.remember_values()
        masks, stats = finetune_round(
            ctx.model, ctx.targets, counts, ctx.finetune, o.finetune_epochs,
            recovery=o.recovery, fraction=o.recovery_fraction, init=o.recovery_init,
            splice_interval=o.splice_interval, last_values=state.last_values or None, rng=self.rng,
            torch_seed=ctx.seed * 1000 + 2 * i, ranks=self.pruner.magnitude_ranks(i),
        )
        state.masks = masks
        state.counts = np.array([int(masks[t.name].sum()) for t in ctx.targets], dtype=np.int64)
        acc = ctx.score() if evaluate and ctx.evaluate is not None else None
        record = RoundRecord(round=i, sparsity=1.0 - state.density, accuracy_after_finetune=acc,
                             layer_sparsity=(1.0 - state.counts / state.numels).tolist(),
                             finetune_seconds=time.perf_counter() - t0, **stats, **info)
        log.info("%s round %d: sparsity %.4f, val accuracy after fine-tune %s", self.pruner.name, i,
                 record["sparsity"], "n/a" if acc is None else f"{acc:.4f}")
        return record

    def _outcome(self) -> Outcome:
        placement = getattr(getattr(self.pruner, "backend", None), "placement", None)
        return Outcome(masks=self.state.masks, targets=list(self.ctx.targets), history=self.history,
                       nfev=self.pruner.nfev, accuracy=self.loop["accuracy"], reference_accuracy=self.reference,
                       extra={"ray_workers": placement} if placement else {})


BUDGET_ROUNDS = 3  # budget form, rounds=None


# accuracy form, rounds=None: stop on `patience` rejections in a row, not after a fixed count. A fixed
# count (3) stopped LeNet-300-100 at 93.8% with validation accuracy 1.3 pp *above* dense while 1 pp of
# drop was allowed; going on reached 98.5% within the drop (BENCHMARKS.md, "The accuracy form").
MAX_ROUNDS = 100


class IterativeOptions(Options):
    rounds: Optional[int] = Field(
        None, ge=1, le=100, description="prune/fine-tune rounds. Budget form: the schedule's steps (None: 3). Accuracy "
                                        "form: the most rounds accepted (None: go on until `patience` rejections in a "
                                        "row, so the allowed drop is used; at most 100)")
    finetune_epochs: int = Field(1, ge=0, description="epochs passed to finetune() per round")
    recovery: str = Field("none", pattern="^(none|random|splicing)$")
    recovery_fraction: float = Field(0.02, ge=0.0, le=1.0, description="random recovery: share of pruned weights re-enabled")
    recovery_init: str = Field("zero", pattern="^(zero|old)$")
    splice_interval: int = Field(10, ge=1, description="splicing: training forwards between mask updates")
    max_layer_sparsity: float = Field(0.995, gt=0.0, le=1.0, description="no layer is pruned beyond this")
    min_layer_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="every layer is pruned at least this much")
    step_density: float = Field(0.6, gt=0.0, lt=1.0, description="accuracy form: density factor per proposed step")
    patience: int = Field(2, ge=1, description="accuracy form: rejected rounds in a row before stopping")
    checkpoint: Optional[str] = Field(None, description="file the whole search state is saved to after every generation")
    resume: bool = Field(False, description="continue from `checkpoint` (a run killed at any point ends identically)")

    def budget_rounds(self) -> int:
        """Steps of the budget form's schedule."""
        return self.rounds if self.rounds is not None else BUDGET_ROUNDS

    def accuracy_rounds(self) -> int:
        """The most accepted rounds of the accuracy form: a stop only when the user set one."""
        return self.rounds if self.rounds is not None else MAX_ROUNDS

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_is_a_file(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and os.path.isdir(v):
            raise ValueError(f"{v!r} is a directory; give a file path, e.g. {os.path.join(v, 'search.ckpt')!r}")
        return v


class IterativePruner(Pruner):
    """A pruner that only decides per-layer keep-counts; the :class:`RoundRunner`
    does the rest (schedule, masks, fine-tuning with recovery, accept / roll back, checkpoints)."""

    Options = IterativeOptions
    needs_evaluate = False
    #: set by the runner before :meth:`begin`: mid-round saving and resuming of a search
    checkpointer: Optional[Checkpointer] = None
    #: fitness evaluations so far, counted by the pruner (the runner resets and checkpoints it)
    nfev: int = 0

    # --- what subclasses provide -------------------------------------------------------
    def allocate(self, state: State, keep: int, round_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Keep-counts summing to ``keep`` for this round, plus information for the history."""
        raise NotImplementedError

    def propose(self, state: State, round_index: int, caution: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Accuracy form: a sparser allocation; ``caution`` counts rejections since the last success."""
        step = self.options.step_density ** (0.5 ** caution)
        keep = int(round(state.counts.sum() * step))
        return self.allocate(state, keep, round_index)

    def begin(self, ctx: Context, reference: Optional[float]) -> None:
        """Called once before the first round (e.g. to set up the search)."""

    def magnitude_ranks(self, round_index: int) -> Optional[list]:
        """The targets' magnitude ranks for this round's weights if the pruner built them (its
        search did), so the runner's mask computation needs no second sort; None otherwise."""
        return None

    def complete(self, outcome: Outcome) -> Outcome:
        """Add the pruner's own findings to the finished run's outcome."""
        return outcome

    def close(self) -> None:
        """Release what :meth:`begin` set up (evaluation workers); called however the run ends."""

    # --- the run ---------------------------------------------------------------------------
    def runner(self) -> RoundRunner:
        return RoundRunner(self, checkpoint=self.options.checkpoint, resume=self.options.resume)

    def run(self, ctx: Context) -> Outcome:
        try:
            return self.complete(self.runner().run(ctx))
        finally:
            self.close()
