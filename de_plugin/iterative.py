"""The outer prune -> fine-tune loop shared by ``de_layerwise`` and the baselines.

Sharing it is what makes comparisons fair: every method gets the same sparsity schedule, the
same fine-tune epochs per round and the same recovery; only the per-layer allocation differs.

* Budget form (``sparsity=s``): ``rounds`` steps whose densities fall geometrically from the
  current density to ``1 - s``; each round allocates keep-counts summing exactly to the step's
  budget, prunes by magnitude inside each layer and fine-tunes.
* Accuracy form (``max_accuracy_drop=d``): each round proposes a sparser allocation, fine-tunes,
  and keeps it only if validation accuracy is still >= reference - d; a rejected round is rolled
  back and the next proposal is more careful. Stops after ``rounds`` accepted rounds, or
  ``patience`` rejections in a row.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Optional

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .options import Options
from .pruner import Context, Pruner
from .recovery import finetune_round
from .result import PruningResult
from .targets import get_param

log = logging.getLogger("de_plugin")


class IterativeOptions(Options):
    rounds: int = Field(3, ge=1, le=100, description="prune/fine-tune rounds (budget form: schedule steps)")
    finetune_epochs: int = Field(1, ge=0, description="epochs passed to finetune() per round")
    recovery: str = Field("none", pattern="^(none|random|splicing)$")
    recovery_fraction: float = Field(0.02, ge=0.0, le=1.0, description="random recovery: share of pruned weights re-enabled")
    recovery_init: str = Field("zero", pattern="^(zero|old)$")
    splice_interval: int = Field(10, ge=1, description="splicing: training forwards between mask updates")
    max_layer_sparsity: float = Field(0.995, gt=0.0, le=1.0, description="no layer is pruned beyond this")
    min_layer_sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="every layer is pruned at least this much")
    step_density: float = Field(0.6, gt=0.0, lt=1.0, description="accuracy form: density factor per proposed step")
    patience: int = Field(2, ge=1, description="accuracy form: rejected rounds in a row before stopping")


class State:
    """Where the loop stands: current keep-counts and sizes of the targets."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.numels = np.array([t.numel for t in ctx.targets], dtype=np.int64)
        self.masks = {t.name: get_param(ctx.model, t).detach() != 0 for t in ctx.targets}
        self.counts = np.array([int(self.masks[t.name].sum()) for t in ctx.targets], dtype=np.int64)
        self.last_values = {t.name: get_param(ctx.model, t).detach().clone() for t in ctx.targets}

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
        for t, w in zip(self.ctx.targets, self.weights()):
            nz = w != 0
            self.last_values[t.name][nz] = w[nz]


def density_schedule(start: float, end: float, rounds: int) -> list[float]:
    """Geometric steps in density (equal compression factor per round)."""
    if end >= start:
        return [end]
    return [float(start * (end / start) ** ((i + 1) / rounds)) for i in range(rounds)]


class IterativePruner(Pruner):
    """A pruner that only decides per-layer keep-counts; the loop does the rest."""

    Options = IterativeOptions
    needs_evaluate = False

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

    # --- checkpoints ---------------------------------------------------------------------
    def _round_start(self, ctx: Context, state: State, round_index: int, history: list, rng, loop: dict) -> None:
        """Remember (and save) where the loop stands before round ``round_index``."""
        path = getattr(self.options, "checkpoint", None)
        if path is None:
            self._snapshot = None
            return
        self._snapshot = {
            "fingerprint": self._fingerprint, "round": round_index, "history": copy.deepcopy(history),
            "model": {k: v.detach().cpu().clone() for k, v in ctx.model.state_dict().items()},
            "counts": state.counts.copy(), "masks": {k: v.cpu().clone() for k, v in state.masks.items()},
            "last_values": {k: v.cpu().clone() for k, v in state.last_values.items()},
            "loop_rng": rng.bit_generator.state, "loop": dict(loop), "nfev": self.nfev,
            "pruner": self.checkpoint_state(),
        }
        ckpt.save(path, self._snapshot)

    def save_search(self, search_state: dict[str, Any]) -> None:
        """Mid-round save: the round-start snapshot plus the search's own state."""
        if getattr(self, "_snapshot", None) is not None:
            ckpt.save(self.options.checkpoint, {**self._snapshot, "search": search_state})

    def take_resumed_search(self, round_index: int) -> Optional[dict[str, Any]]:
        """The saved mid-round search state for this round, once."""
        data = getattr(self, "_resumed_search", None)
        if data is not None and data[0] == round_index:
            self._resumed_search = None
            return data[1]
        return None

    def _load_checkpoint(self, ctx: Context) -> Optional[dict[str, Any]]:
        o = self.options
        path, resume = getattr(o, "checkpoint", None), getattr(o, "resume", False)
        self._fingerprint = ckpt.fingerprint(self.name, ctx, o.model_dump())
        self._resumed_search = None
        if resume and path is None:
            raise ValueError("resume=True needs checkpoint='path/to/search.ckpt' (the file to continue from)")
        if not resume or path is None:
            return None
        import os

        if not os.path.exists(path):
            log.info("no checkpoint at %s yet: starting a new search", path)
            return None
        return ckpt.load(path, self._fingerprint)

    # --- the loop ------------------------------------------------------------------------
    def run(self, ctx: Context) -> PruningResult:
        o = self.options
        state = State(ctx)
        if ctx.sparsity is not None:  # checks that need no evaluation come first
            keep_final = int(round(state.total * (1.0 - ctx.sparsity)))
            if keep_final < int(state.min_keep(o.max_layer_sparsity).sum()):
                raise ValueError(
                    f"sparsity {ctx.sparsity} needs some layer above max_layer_sparsity={o.max_layer_sparsity}; "
                    "raise max_layer_sparsity or lower sparsity"
                )
            if o.min_layer_sparsity > o.max_layer_sparsity:
                raise ValueError("min_layer_sparsity must not exceed max_layer_sparsity")
            if keep_final > int(state.max_keep(o.min_layer_sparsity).sum()):
                if keep_final <= int(state.counts.sum()):
                    raise ValueError(
                        f"sparsity {ctx.sparsity} is below min_layer_sparsity={o.min_layer_sparsity}; "
                        "lower min_layer_sparsity or raise sparsity"
                    )
                raise ValueError(
                    f"the selected layers are already {1 - state.density:.4f} sparse, more than the requested "
                    f"sparsity={ctx.sparsity}; ask for a higher sparsity"
                )
        resumed = self._load_checkpoint(ctx)
        if resumed is not None:  # the model and loop as they stood at the start of the saved round
            ctx.model.load_state_dict(resumed["model"])
            state.counts, state.masks = resumed["counts"].copy(), dict(resumed["masks"])
            state.last_values = dict(resumed["last_values"])
        reference = resumed["loop"]["reference"] if resumed is not None else (
            ctx.score() if ctx.evaluate is not None else None)
        if reference is not None:
            log.info("%s: dense reference accuracy %.4f", self.name, reference)
        self.nfev = 0
        self.begin(ctx, reference)
        history: list[dict[str, Any]] = []
        rng = np.random.default_rng(ctx.seed)
        start = 0
        if resumed is not None:
            history = resumed["history"]
            rng.bit_generator.state = resumed["loop_rng"]
            self.nfev = resumed["nfev"]
            self.restore_checkpoint_state(resumed["pruner"])
            start = resumed["round"]
            if "search" in resumed:
                self._resumed_search = (start, resumed["search"])
            log.info("%s: resuming from %s at round %d", self.name, self.options.checkpoint, start)

        def one_round(i: int, counts: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
            t0 = time.perf_counter()
            state.remember_values()
            masks, stats = finetune_round(
                ctx.model, ctx.targets, counts, ctx.finetune, o.finetune_epochs,
                recovery=o.recovery, fraction=o.recovery_fraction, init=o.recovery_init,
                splice_interval=o.splice_interval, last_values=state.last_values, rng=rng,
                torch_seed=ctx.seed * 1000 + 2 * i,
            )
            state.masks = masks
            state.counts = np.array([int(masks[t.name].sum()) for t in ctx.targets], dtype=np.int64)
            acc = ctx.score() if ctx.evaluate is not None else None
            rec = {"round": i, "sparsity": 1.0 - state.density, "accuracy_after_finetune": acc,
                   "layer_sparsity": (1.0 - state.counts / state.numels).tolist(),
                   "finetune_seconds": time.perf_counter() - t0, **stats, **info}
            log.info("%s round %d: sparsity %.4f, val accuracy after fine-tune %s", self.name, i,
                     rec["sparsity"], "n/a" if acc is None else f"{acc:.4f}")
            return rec

        accuracy = reference  # accuracy of the model as it stands after the last kept round
        if resumed is not None:
            accuracy = resumed["loop"]["accuracy"]
        if ctx.sparsity is not None:
            plan = resumed["loop"]["plan"] if resumed is not None else density_schedule(
                state.density, 1.0 - ctx.sparsity, o.rounds)
            for i, d in enumerate(tqdm(plan, desc=f"{self.name} rounds", disable=not ctx.progress)):
                if i < start:
                    continue
                self._round_start(ctx, state, i, history, rng,
                                  {"plan": plan, "reference": reference, "accuracy": accuracy})
                keep = keep_final if i == len(plan) - 1 else int(round(state.total * d))
                keep = min(keep, int(state.max_keep(o.min_layer_sparsity).sum()))  # min_layer_sparsity first
                t0 = time.perf_counter()
                counts, info = self.allocate(state, keep, i)
                info = {"target_sparsity": 1.0 - keep / state.total, "search_seconds": time.perf_counter() - t0, **info}
                history.append(one_round(i, counts, info))
                accuracy = history[-1]["accuracy_after_finetune"]
        else:
            limit = reference - ctx.max_accuracy_drop
            accepted, caution, i = 0, 0, 0
            if resumed is not None:
                accepted, caution, i = (resumed["loop"][k] for k in ("accepted", "caution", "i"))
            pbar = tqdm(total=o.rounds, desc=f"{self.name} rounds", disable=not ctx.progress)
            while accepted < o.rounds and caution < o.patience:
                self._round_start(ctx, state, i, history, rng, {"accepted": accepted, "caution": caution, "i": i,
                                                               "reference": reference, "accuracy": accuracy})
                snapshot = (copy.deepcopy(ctx.model.state_dict()), state.counts.copy(), state.masks)
                t0 = time.perf_counter()
                counts, info = self.propose(state, i, caution)
                info = {"search_seconds": time.perf_counter() - t0, **info}
                if int(np.sum(counts)) >= int(state.counts.sum()):
                    info["accepted"] = False
                    info["reason"] = "no sparser feasible allocation found"
                    history.append({"round": i, **info})
                    caution += 1
                    i += 1
                    continue
                rec = one_round(i, counts, info)
                rec["accepted"] = rec["accuracy_after_finetune"] >= limit
                history.append(rec)
                if rec["accepted"]:
                    accepted, caution = accepted + 1, 0
                    accuracy = rec["accuracy_after_finetune"]
                    pbar.update(1)
                else:
                    ctx.model.load_state_dict(snapshot[0])
                    state.counts, state.masks = snapshot[1], snapshot[2]
                    caution += 1
                    log.info("round %d rejected (%.4f < %.4f): rolled back", i, rec["accuracy_after_finetune"], limit)
                i += 1
            pbar.close()
        path = getattr(o, "checkpoint", None)
        if path is not None:  # the finished search: resuming it returns at once with the same result
            self._round_start(ctx, state, 10**9, history, rng, {"plan": [], "accepted": o.rounds, "caution": 0,
                                                                "i": i if ctx.sparsity is None else 0,
                                                                "reference": reference, "accuracy": accuracy})
        return PruningResult(self.name, state.masks, 0.0, {}, accuracy, reference, history, self.nfev, 0.0)
