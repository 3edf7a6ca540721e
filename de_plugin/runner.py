"""The round loop every iterative pruner goes through: ``start(ctx)``, ``step()`` until ``done``,
``finish()``.

Like Torch-Pruning's ``pruner.step()``, whoever owns the loop drives it: :func:`de_plugin.prune`
runs it to the end; an NNI schedule (AGP, Linear) calls ``step(target_sparsity=...)`` at each of its
mask updates. :class:`RoundLoop` owns what every pruner's rounds share: the dense reference, the
history, a checkpoint at every round start (and, through :class:`Checkpointer`, after every search
generation) and resuming from it. What a round is belongs to the pruner's loop:
:class:`~de_plugin.weights.rounds.RoundRunner` (per-layer keep-counts: ``de_layerwise``, the
baselines, plugins), ``de_channel``'s :class:`~de_plugin.channels.channel.ChannelRounds` and
``random_coarse``'s single :class:`~de_plugin.channels.coarse.CoarseRound`.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Optional

import numpy as np

from . import checkpoint as ckpt
from .progress import progress_bar
from .pruner import Context, Pruner
from .result import Outcome

log = logging.getLogger("de_plugin")


class RoundRecord(dict):
    """One step's entry of the history (plain data, JSON-ready): ``round``, ``sparsity``,
    ``accuracy_after_finetune``, ``layer_sparsity``, timings, the allocator's own information and,
    in the accuracy form, ``accepted``."""

    @property
    def accepted(self) -> bool:
        return bool(self.get("accepted", True))


class Checkpointer:
    """The runner's side of mid-round saving, handed to the pruner: ``save(search_state)`` after a
    generation, ``resumed(round)`` the saved search state of that round (once)."""

    def __init__(self, runner: "RoundLoop"):
        self._runner = runner
        self._resumed: Optional[tuple[int, dict[str, Any]]] = None

    def save(self, search_state: dict[str, Any]) -> None:
        r = self._runner
        if r.checkpoint is not None and r._snapshot is not None:
            ckpt.save(r.checkpoint, {**r._snapshot, "search": search_state})

    def resumed(self, round_index: int) -> Optional[dict[str, Any]]:
        if self._resumed is not None and self._resumed[0] == round_index:
            data, self._resumed = self._resumed[1], None
            return data
        return None


class RoundLoop:
    """What every iterative pruner's rounds share: ``start(ctx)``, ``step()`` until ``done``, ``finish()``;
    the dense reference, the history, a checkpoint written at every round start (and by the pruner after
    every search generation, through :class:`Checkpointer`) and ``resume``. Subclasses say what a round
    is: :class:`RoundRunner` (per-layer keep-counts: ``de_layerwise``, the baselines, plugins) and
    ``de_channel``'s channel rounds.

    ``checkpoint``: a file the whole state is written to atomically at every round start; ``resume=True``
    continues from it, so a run killed at any point ends with the masks an uninterrupted run gives.
    """

    def __init__(self, pruner: Pruner, checkpoint: Optional[str] = None, resume: bool = False):
        if resume and checkpoint is None:
            raise ValueError("resume=True needs checkpoint='path/to/search.ckpt' (the file to continue from)")
        self.pruner, self.checkpoint, self.resume = pruner, checkpoint, resume
        self.checkpointer = Checkpointer(self)
        self._snapshot: Optional[dict[str, Any]] = None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ what a subclass provides
    def _setup(self, ctx: Context) -> None:
        """Before anything is scored: the subclass's own state and every check that needs no evaluation."""

    def _reference(self) -> Optional[float]:
        """The dense model's score (not measured on resume: the checkpoint holds it)."""
        return self.ctx.score() if self.ctx.evaluate is not None else None

    def _begin(self) -> None:
        """After the reference is known, before a resumed state is loaded (e.g. the pruner's ``begin``)."""

    def _new_loop(self) -> dict[str, Any]:
        """The loop's plain-data state: at least ``plan`` (the steps' goals) and ``next`` (the next step)."""
        raise NotImplementedError

    def _step(self) -> RoundRecord:
        raise NotImplementedError

    def _outcome(self) -> Outcome:
        raise NotImplementedError

    def _progress_total(self) -> tuple[Optional[int], int]:
        """The progress bar's (total, done so far)."""
        return len(self.loop["plan"]), self.loop["next"]

    def _state(self) -> dict[str, Any]:
        """The subclass's part of :meth:`state_dict`."""
        return {}

    def _load_state(self, data: dict[str, Any]) -> None:
        """Inverse of :meth:`_state`."""

    @property
    def done(self) -> bool:
        return self.loop["next"] >= len(self.loop["plan"])

    # ------------------------------------------------------------------ start
    def start(self, ctx: Context) -> None:
        """Check the goal, measure the reference (or resume), set up the pruner."""
        self.ctx, o = ctx, self.pruner.options
        self._setup(ctx)
        self._fingerprint = ckpt.fingerprint(self.pruner.name, ctx, o.model_dump())
        saved = self._load()
        self.reference = saved["loop"]["reference"] if saved is not None else self._reference()
        if self.reference is not None:
            log.info("%s: dense reference accuracy %.4f", self.pruner.name, self.reference)
        self.pruner.nfev = 0
        self.pruner.checkpointer = self.checkpointer
        self._begin()
        self.rng = np.random.default_rng(ctx.seed)
        self.loop = self._new_loop()
        if saved is not None:
            self.load_state_dict(saved)
            log.info("%s: resuming from %s at round %d", self.pruner.name, self.checkpoint, saved["round"])
        total, so_far = self._progress_total()
        self._bar = progress_bar(total=total, desc=f"{self.pruner.name} rounds", leave=True,
                                 enabled=bool(ctx.progress) and total != 0)
        self._bar.update(so_far)

    def _load(self) -> Optional[dict[str, Any]]:
        if not self.resume:
            return None
        if not os.path.exists(self.checkpoint):
            log.info("no checkpoint at %s yet: starting a new search", self.checkpoint)
            return None
        return ckpt.load(self.checkpoint, self._fingerprint)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Where the run stands between rounds, as plain data (what a checkpoint holds)."""
        return {
            "fingerprint": self._fingerprint, "round": self.loop["next"], "history": copy.deepcopy(self.history),
            "model": {k: v.detach().cpu().clone() for k, v in self.ctx.model.state_dict().items()},
            "loop_rng": self.rng.bit_generator.state, "loop": dict(self.loop), "nfev": self.pruner.nfev,
            "pruner": self.pruner.checkpoint_state(), **self._state(),
        }

    def load_state_dict(self, data: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (after :meth:`start` built the pruner)."""
        self.ctx.model.load_state_dict(data["model"])
        self._load_state(data)
        self.history = data["history"]
        self.rng.bit_generator.state = data["loop_rng"]
        self.loop = dict(data["loop"])
        self.pruner.nfev = data["nfev"]
        self.pruner.restore_checkpoint_state(data["pruner"])
        if "search" in data:
            self.checkpointer._resumed = (data["round"], data["search"])

    def _round_start(self) -> None:
        """Remember (and save) where the run stands before the next round."""
        self._snapshot = self.state_dict() if self.checkpoint is not None else None
        if self._snapshot is not None:
            ckpt.save(self.checkpoint, self._snapshot)

    # ------------------------------------------------------------------ steps
    def step(self) -> RoundRecord:
        """One round of the run's own plan."""
        if self.done:
            raise RuntimeError("the run has finished: call finish()")
        self._round_start()
        record = self._step()
        self.history.append(record)
        return record

    def finish(self) -> Outcome:
        """The outcome; with a checkpoint, the finished state is saved so resuming returns it at once."""
        self._bar.close()
        if self.checkpoint is not None:
            self._round_start()
        return self._outcome()

    def run(self, ctx: Context) -> Outcome:
        """``start``, every step, ``finish``: the whole run (what :func:`de_plugin.prune` does)."""
        self.start(ctx)
        try:
            while not self.done:
                self.step()
        except KeyboardInterrupt:
            if self.checkpoint:
                log.warning("interrupted: the search state is in %s; run again with resume=True to continue",
                            self.checkpoint)
            raise
        return self.finish()


