"""Pruners that only decide per-layer keep-counts; :mod:`de_plugin.runner` runs their rounds.

``de_layerwise`` and the search-free baselines (uniform, global magnitude, LAMP, ERK) are such
pruners, and so are third-party ones (``tests/test_plugins.py``). Sharing the runner is what makes
comparisons fair: every method gets the same sparsity schedule and fine-tune epochs per round, and,
given the same ``recovery`` option, the same recovery; only the per-layer allocation differs. The
defaults differ: ``de_layerwise`` recovers by ``splicing``, the baselines by ``none``, so a fair
comparison sets ``recovery`` on both (the benchmarks do).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np
from pydantic import Field, field_validator

from .options import Options
from .pruner import Context, Pruner
from .result import Outcome
from .runner import Checkpointer, RoundRunner, State

log = logging.getLogger("de_plugin")


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
    """A pruner that only decides per-layer keep-counts; the :class:`~de_plugin.runner.RoundRunner`
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

    def checkpoint_state(self) -> dict[str, Any]:
        """The pruner's own state at a round boundary (RNGs, warm-start data), plain data."""
        return {}

    def restore_checkpoint_state(self, data: dict[str, Any]) -> None:
        """Inverse of :meth:`checkpoint_state`, called after :meth:`begin` when resuming."""

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
