"""``de_channel``: DE searches how many channels each coupled group keeps, under a MACs or
parameter budget; the coarse machinery removes and scores them (our two methods combined).

The decision vector holds one removed share per coupled channel group (:mod:`de_plugin.channels.coupling`,
the groups ``random_coarse`` prunes). Every DE vector is projected onto the budget
(:class:`~de_plugin.channels.cost.ChannelSpace`: the allocation of that shape keeping the most
without exceeding it), the channels within each group are the smallest by L1 norm of the group's
filters (Li et al.), and the candidate is scored on validation data after adaptive BN, as
``random_coarse`` scores its masks. Rounds prune towards the budget geometrically with retraining
in between, like ``de_layerwise``; a channel removed in one round stays removed. With
``channel_choice="random"`` the last round's channels are the best of ``candidates`` random draws
at the searched counts instead (``random_coarse``'s choice, the searched ratios).

The seeds of the population are the uniform ratio (what L1-filter pruning and Torch-Pruning's
default do), a global L1 ranking normalised per group (Torch-Pruning's ``global_pruning``) and
the previous round's shape, so the search starts from the baselines it is compared with.
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn

from ..search.allocator import Allocator, SearchOptions, population_for, search_state, start_search
from .cost import ChannelCost, ChannelSpace
from .coarse import (CoarseOptions, CoarseScorer, CoarseSpace, apply_and_retrain, calibration_batches, capture_input, count_macs, structured_outcome)
from ..search.de import DifferentialEvolution
from ..evaluation import backend_round, make_backend
from ..hookspecs import hookimpl
from .latency import LatencyTable, measure as measure_latency
from ..pruner import Context, Pruner
from ..result import Outcome
from ..runner import Checkpointer, RoundLoop, RoundRecord
from ..search.selection import RetrainedMeasure, capped, check_finalists
from .slicing import speedup as slice_channels
from ..targets import Target, apply_masks

log = logging.getLogger("de_plugin")


class ChannelOptions(SearchOptions):
    """Options of ``de_channel``: exactly one budget, as a fraction of the dense model's cost."""

    macs: Optional[float] = Field(None, gt=0.0, le=1.0, description="fraction of the dense MACs kept")
    params: Optional[float] = Field(None, gt=0.0, le=1.0, description="fraction of the dense parameters kept")
    latency: Optional[float] = Field(None, gt=0.0, le=1.0, description="fraction of the dense model's latency on "
                                                                         "this machine (at latency_batch)")
    latency_batch: int = Field(1, ge=1, description="batch size the latency budget is measured at")
    latency_cache: Optional[str] = Field("~/.cache/de_plugin/latency", description="folder of per-layer latency "
                                         "tables (per model, batch, threads); None: time the layers every run")
    rounds: int = Field(2, ge=1, le=20, description="prune / retrain rounds; the budget falls geometrically")
    finetune_epochs: int = Field(1, ge=0, description="epochs passed to finetune() after each round")
    max_group_ratio: float = Field(0.8, gt=0.0, lt=1.0, description="at most this share of a group's channels removed")
    channel_choice: Literal["l1", "random"] = Field(
        "l1", description="which channels a group loses: smallest L1 norm, or the best of `candidates` random draws "
                          "at the searched counts (last round)")
    candidates: int = Field(20, ge=1, description="channel_choice='random': random draws scored")
    finalists: int = Field(0, ge=0, description="short-term fine-tune re-ranking (NetAdapt): the `finalists` best "
                           "distinct shapes of the search and its seeds (uniform, global L1) are each retrained for "
                           "finalist_epochs on the model (restored after) and re-scored; the best then wins. Accuracy "
                           "right after pruning favours shapes that retrain worse. 0: off; needs `finetune`")
    finalist_epochs: int = Field(1, ge=1, description="epochs each finalist is retrained for before it is re-scored")
    finalist_steps: Optional[int] = Field(None, ge=1, description="stop each finalist's retraining after this many "
                                          "training batches (forward calls in train mode); None: whole epochs")
    selection_fallback: bool = Field(
        True, description="finalists: when the short retraining lowers every finalist's score (it has not recovered "
                          "them, so it ranks noise), choose by the search's scores before it instead")
    finalist_adaptive_bn: bool = Field(
        True, description="finalists, with adaptive BN on: re-estimate BatchNorm statistics on the search's batches "
                          "before scoring a retrained finalist, as the search scored it; False: score with the running "
                          "statistics the short retraining left (they lag its weights)")
    include_linear: bool = Field(False, description="also search the hidden units of Linear layers (MLP blocks)")
    unresolved: Literal["raise", "skip"] = "raise"
    adaptive_bn: Optional[bool] = Field(None, description="re-estimate BatchNorm before scoring; None: if the model has BN")
    bn_batches: int = Field(4, ge=1)
    backend: Literal["serial", "process", "ray"] = Field("serial", description="where candidates are scored")
    checkpoint: Optional[str] = Field(None, description="file the search state is saved to after every generation")
    resume: bool = Field(False, description="continue from `checkpoint` (a killed run ends identically)")

    @model_validator(mode="after")
    def _one_budget(self) -> "ChannelOptions":
        given = [k for k in ("macs", "params", "latency") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one budget: macs=0.5 (keep half the dense MACs), params=0.5 (half the "
                             "parameters) or latency=0.5 (half the dense latency on this machine); got "
                             f"{', '.join(given) if given else 'none'}")
        if self.finalist_steps is not None and not self.finalists:
            raise ValueError(f"finalist_steps={self.finalist_steps} caps the finalists' retraining: give finalists=N "
                             "(N > 0) too, or leave finalist_steps unset")
        return self

    @property
    def measure(self) -> str:
        return next(k for k in ("macs", "params", "latency") if getattr(self, k) is not None)

    @property
    def budget(self) -> float:
        return float(getattr(self, self.measure))


class ChannelScorer(CoarseScorer):
    """Scores unit counts per group: the group's lowest-ranked channels removed, adaptive BN, score.

    Ranks are the L1 norms of the round's weights, or for a ``{"q": counts, "draw": seed}`` candidate
    random (the draw's seed); channels removed in earlier rounds always rank lowest."""

    def __init__(self, model: nn.Module, space: CoarseSpace, cost: ChannelCost, score, calib, bn_batches: int):
        self.cost = cost
        super().__init__(model, space, score, calib, bn_batches)

    def reset(self) -> None:
        super().reset()
        self.removed, self.norms = [], []
        for g in self.space.groups:
            norm = sum(self.space.param(p + ".weight").detach().abs().flatten(1).sum(1).double().cpu().numpy()
                       for p in g.producers)
            self.norms.append(norm)
            self.removed.append(norm == 0)  # zeroed by an earlier round's masks

    def candidate(self, cand: Any) -> dict[str, Any]:
        q, draw = (cand["q"], cand["draw"]) if isinstance(cand, dict) else (cand, None)
        rng = None if draw is None else np.random.default_rng(draw)
        keep = []
        for g, norm, gone, qi, size in zip(self.space.groups, self.norms, self.removed, q, self.cost.size):
            rank = np.where(gone, -np.inf, norm if rng is None else rng.random(len(norm)))
            block = g.block if g.block > 1 else g.channels
            k = np.ones(g.channels, dtype=bool)
            for start in range(0, g.channels, block):
                k[start + np.argsort(rank[start:start + block], kind="stable")[:int(size - qi)]] = False
            keep.append(k)
        return {"channels": keep, "kernels": []}

    def score(self, candidate: Any, floor: Optional[float] = None) -> float:
        return super().score(self.candidate(candidate), floor)


class DEChannel(Pruner):
    """DE over per-group channel counts under a MACs / parameter budget (``de_channel``)."""

    #: set by the round loop: mid-round saving and resuming of a search; fitness evaluations so far
    checkpointer: Optional[Checkpointer] = None
    nfev: int = 0
    name = "de_channel"
    Options = ChannelOptions
    goal = "ratios"
    goal_options = "its budget option (macs=0.5 or params=0.5: the fraction of the dense cost kept)"

    def check_call(self, finetune, sparsity) -> None:
        o: ChannelOptions = self.options  # type: ignore[assignment]
        if o.finalists and finetune is None:
            raise ValueError(f"finalists={o.finalists} re-ranks the search's best shapes after a short retraining, "
                             "which needs a `finetune` callable: pass finetune=, or leave finalists=0")

    def runner(self) -> "ChannelRounds":
        """The round loop to step yourself: ``start(ctx)``, ``step()`` until ``done``, ``finish()``, then
        :meth:`close` (what :meth:`run` does)."""
        return ChannelRounds(self, self.options.checkpoint, self.options.resume)

    def run(self, ctx: Context) -> Outcome:
        try:
            return self.runner().run(ctx)
        finally:
            self.close()

    def close(self) -> None:
        """Release the evaluation backend (workers); called however the run ends."""
        backend, self.backend = getattr(self, "backend", None), None
        if backend is not None:
            backend.close()

    def setup(self, ctx: Context) -> None:
        """Before the first round: the coupled channel groups, their cost (and latency table), the reachable
        budget, calibration batches and the evaluation backend; every check before any search."""
        o: ChannelOptions = self.options  # type: ignore[assignment]
        self.check_call(ctx.finetune, ctx.sparsity)
        model = ctx.model
        example = _example(ctx)
        if example is None:
            example, _ = capture_input(model, lambda: ctx.score(model))
        space, cost = channel_space(model, example, ctx.targets, o)
        self.space, self.cost, self.example = space, cost, example
        check_finalists(o.finalists, population_for(o.population, len(cost.size), o.search_strategy), "finalists")
        lo = np.ceil(cost.size * (1.0 - o.max_group_ratio) - 1e-9).astype(np.int64).clip(1)
        if o.measure == "latency":
            self._latency_table(model, lo)
        dense = cost.dense(o.measure)
        least = cost.cost(lo, o.measure) / dense
        if least > o.budget + 1e-12:
            raise ValueError(f"{o.measure}={o.budget} is out of reach: with at most max_group_ratio={o.max_group_ratio} "
                             f"of each group's channels removed (and layers that reach the output or are excluded "
                             f"kept whole) the smallest reachable is {o.measure}={least:.4f}; raise the budget or "
                             "max_group_ratio")
        self.min_q = lo
        calib = calibration_batches(model, CoarseOptions(adaptive_bn=o.adaptive_bn), ctx.train_batches, ctx.val_batches)
        scorer = ChannelScorer(model, space, cost, ctx.score, calib, o.bn_batches)
        self.backend = make_backend(o.backend, scorer, o.workers, o.threads_per_worker, o.ray_address,
                                    runtime_env=o.ray_runtime_env)
        self.calib = calib

    def _latency_table(self, model: nn.Module, lo: np.ndarray) -> None:
        """Check that the model can be sliced, then time its layers (or read the cached table)."""
        o: ChannelOptions = self.options  # type: ignore[assignment]
        try:
            self._sliced(model, lo)
        except Exception as exc:  # noqa: BLE001 - the reason goes to the user
            raise ValueError(f"a latency budget needs a model that can be made physically smaller, and slicing this "
                             f"one fails ({type(exc).__name__}: {exc}); use macs= or params= instead") from exc
        log.info("%s: building the per-layer latency table at batch %d (%d threads)", self.name, o.latency_batch,
                 torch.get_num_threads())
        self.cost.table = table = LatencyTable(model, self.example, self.cost.prunable, o.latency_batch, o.latency_cache)
        self.latency_dense = measure_latency(model, self.example, o.latency_batch, repeats=30)
        if not table.fitted:  # whole sliced models at uniform shares: overhead and what the layers alone miss
            samples = [(*self.cost.kept_shares(self.cost.size), self.latency_dense)]
            for share in (0.25, 0.5, 0.75):
                q = np.clip(np.round(share * self.cost.size).astype(np.int64), lo, self.cost.size)
                small = self._sliced(model, q)
                samples.append((*self.cost.kept_shares(q), measure_latency(small, self.example, o.latency_batch,
                                                                           repeats=30)))
            table.fit(samples)
        log.info("%s: latency model %.2f ms + %.2f x layer time (dense %.2f ms measured)", self.name,
                 1000 * table.a, table.b, 1000 * self.latency_dense)

    def _sliced(self, model: nn.Module, q: np.ndarray) -> nn.Module:
        """A physically smaller copy of ``model`` keeping ``q`` (L1 channels of its current weights)."""
        scorer = ChannelScorer(model, self.space, self.cost, lambda m: 0.0, None, 1)
        masks = self.space.masks(scorer.candidate(q))
        small = copy.deepcopy(model)
        apply_masks(small, masks)
        slice_channels(small, self.example, masks, self.space.groups)
        return small

    def _check_latency(self, model: nn.Module, q: np.ndarray, share: float, space: ChannelSpace,
                       ) -> tuple[np.ndarray, float, list[float]]:
        """Measure the sliced model; while it misses ``share`` of the dense latency by more than 5%, re-project
        the allocation's shape onto a budget corrected by the miss (at most 3 times). Returns the allocation
        whose measured latency is within budget and closest to it, its measured share and every one measured."""
        o: ChannelOptions = self.options  # type: ignore[assignment]
        tries, budget = [], share * self.cost.dense("latency")
        for _ in range(4):
            got = measure_latency(self._sliced(model, q), self.example, o.latency_batch, repeats=30) / self.latency_dense
            tries.append((q, got))
            if abs(got - share) <= 0.05 * share:
                break
            # a noisy measurement must not swing the allocation far, nor back to the dense model
            budget = min(budget * float(np.clip(share / got, 0.5, 2.0)), 0.99 * self.cost.dense("latency"))
            q = space.project_density(q / self.cost.size, budget)
        within = [t for t in tries if t[1] <= share * 1.05]
        best = max(within, key=lambda t: t[1]) if within else min(tries, key=lambda t: t[1])
        return best[0], best[1], [t[1] for t in tries]

    # ------------------------------------------------------------------ rounds
    def round(self, ctx: Context, i: int, budget: float, q_now: np.ndarray) -> dict[str, Any]:
        """Round ``i``: search channel counts within ``budget`` (absolute cost) from the current ``q_now``, prune
        to them (L1 channels), retrain; the round's record."""
        o: ChannelOptions = self.options  # type: ignore[assignment]
        calib = self.calib
        t0 = time.perf_counter()
        q, score, de = self._search(ctx, o, q_now, budget, i, calib)
        if o.measure == "latency":
            space = ChannelSpace(self.cost, o.measure, np.minimum(self.min_q, q_now), q_now, o.max_group_ratio)
            searched = q
            q, de["latency"], de["latency_measured"] = self._check_latency(ctx.model, q, budget / self.cost.dense(o.measure),
                                                                           space)
            if not np.array_equal(q, searched):
                with backend_round(self.backend):
                    score = float(self.backend.evaluate([q])[0])
        masks = self.space.masks(self.backend.scorer.candidate(q))
        if o.channel_choice == "random" and i == o.rounds - 1:
            masks, score, de["random_scores"] = self._best_random(q)
        search_s = time.perf_counter() - t0
        self.nfev += de["nfev"]
        apply_and_retrain(ctx.model, self.space, masks, ctx.finetune, _coarse(o), ctx.seed * 1000 + i, calib,
                          None, self.name)
        after = ctx.score()
        dense = self.cost.dense(o.measure)
        rec = {"round": i, "budget": budget / dense, "q": [int(v) for v in q],
               "kept_channels": [int(v) for v in q * self.cost.step],
               "macs": self.cost.macs(q) / self.cost.macs_dense, "params": self.cost.params(q) / self.cost.params_dense,
               **({"latency": de["latency"], "latency_predicted": self.cost.latency(q) /
                   self.cost.dense("latency")} if o.measure == "latency" else {}),
               "val_accuracy_before_finetune": score, "accuracy_after_finetune": after,
               "search_seconds": search_s, "finetune_seconds": time.perf_counter() - t0 - search_s, "de": de}
        log.info("%s round %d: %s %.4f of dense (budget %.4f), val %.4f before / %.4f after fine-tuning", self.name, i,
                 o.measure, rec[o.measure], rec["budget"], score, after)
        return rec

    def _search(self, ctx: Context, o: ChannelOptions, q_now: np.ndarray, budget: float, i: int,
                calib: Optional[list]) -> tuple[np.ndarray, float, dict[str, Any]]:
        space = ChannelSpace(self.cost, o.measure, np.minimum(self.min_q, q_now), q_now, o.max_group_ratio)
        with backend_round(self.backend) as scorer:
            saved = self.checkpointer.resumed(i) if self.checkpointer is not None else None
            # the seeds start the population, and are finalists too: a resumed search without finalists skips them
            seeds = self._seeds(space, scorer, q_now, budget) if saved is None or o.finalists else []
            maxfun = None if o.max_evals is None else max(1, o.max_evals // o.rounds)
            search, solver = start_search(self.backend, o, self.rng, space, seeds, maxfun, saved=saved,
                                          progress=ctx.progress, on_generation=self._saver())
            self._search_rng = self.rng.bit_generator.state
            short = self._short_finetune(ctx, o, i, calib) if o.finalists else None
            best = search.maximise(solver, space, budget, f"{self.name} round {i}", rescore=short, top=o.finalists,
                                   include=seeds, fallback=o.selection_fallback)
            score = search.score(best)
        info = search.info(solver)
        if short is not None:
            info["finalists"] = [{"q": list(k), "score_after_short_finetune": v, "search_score": search.cache.get(k)}
                                 for k, v in search.rescored.items()]
            info.update(short.cost())
            info["selection_fallback_used"] = search.fell_back
        return best, score, info

    def _short_finetune(self, ctx: Context, o: ChannelOptions, i: int, calib: Optional[list]):
        """Re-scorer of the finalists: prune the model to the shape, retrain it for ``finalist_epochs``
        (the final retraining's seed, so every finalist sees the same batches), score, put the weights back
        (one copy of them serves every finalist)."""
        short = _coarse(o).model_copy(update={"finetune_epochs": o.finalist_epochs})

        def retrain(q: np.ndarray) -> None:
            masks = self.space.masks(self.backend.scorer.candidate(q))
            apply_and_retrain(ctx.model, self.space, masks, capped(ctx.finetune, o.finalist_steps), short,
                              ctx.seed * 1000 + i, calib, None, self.name)
        return RetrainedMeasure(ctx.model, retrain, ctx.score, o.finalist_epochs, o.finalist_steps,
                                calib=calib[:o.bn_batches] if calib and o.finalist_adaptive_bn else None)

    def _seeds(self, space: ChannelSpace, scorer: ChannelScorer, q_now: np.ndarray, budget: float) -> list[np.ndarray]:
        """Uniform ratio, previous shape, global L1 normalised per group (at a few depths)."""
        seeds = [space.project_density(np.ones(len(q_now)), budget), space.fit(q_now, budget)]
        normed = [np.where(gone, -np.inf, n / max(n[~gone].mean() if (~gone).any() else 1.0, 1e-12))
                  for n, gone in zip(scorer.norms, scorer.removed)]
        finite = np.concatenate([v[np.isfinite(v)] for v in normed])
        for share in (0.3, 0.5, 0.7):
            tau = np.quantile(finite, share)
            dens = np.array([max(float(np.mean(v >= tau)), 1e-3) for v in normed])
            seeds.append(space.project_density(dens, budget))
        uniq: dict[tuple, np.ndarray] = {}
        for s in seeds:
            uniq.setdefault(tuple(int(v) for v in s), s)
        return list(uniq.values())

    def _saver(self):
        def save(search: Allocator, solver: DifferentialEvolution) -> None:
            if self.checkpointer is not None:
                self.checkpointer.save(search_state(search, solver, self._search_rng))
        return save

    def _best_random(self, q: np.ndarray) -> tuple[dict[str, torch.Tensor], float, list[float]]:
        o: ChannelOptions = self.options  # type: ignore[assignment]
        draws = [{"q": q, "draw": int(d)} for d in self.rng.integers(2**31, size=o.candidates)]
        with backend_round(self.backend) as scorer:
            scores = self.backend.evaluate(draws)
            best = int(np.argmax(scores))
            masks = self.space.masks(scorer.candidate(draws[best]))
        return masks, float(scores[best]), [float(s) for s in scores]

    # ------------------------------------------------------------------ result
    def outcome(self, ctx: Context, q: np.ndarray, history: list, reference: Optional[float]) -> Outcome:
        """The run's outcome once the rounds reached ``q``: weight masks of the pruned layers, the channel
        and bias masks beside them, MACs and parameters."""
        space, model, example = self.space, ctx.model, self.example
        with backend_round(self.backend) as scorer:
            masks = space.masks(scorer.candidate(q))  # the channels the rounds removed (zero norms now)
        macs = count_macs(model, example, masks)
        extra = {"measure": self.options.measure, "budget": self.options.budget,
                 "macs": macs["macs"], "macs_dense": macs["macs_dense"], "macs_kept": macs["macs"] / macs["macs_dense"],
                 "params": macs["params"], "params_dense": macs["params_dense"],
                 "params_kept": macs["params"] / macs["params_dense"], "layer_macs": macs["layer_macs"],
                 "groups": [{"layers": g.producers, "channels": g.channels, "kept": int(k)}
                            for g, k in zip(space.groups, np.asarray(q) * self.cost.step)]}
        return structured_outcome(ctx, space, masks, history, self.nfev, reference, extra)


class ChannelRounds(RoundLoop):
    """``de_channel``'s rounds through the shared loop (checkpoints, resume, ``step()``): the budget falls
    geometrically to ``macs`` / ``params`` / ``latency`` over ``rounds`` steps; each step searches the
    channel counts, prunes and retrains (:meth:`DEChannel.round`)."""

    pruner: DEChannel

    def _setup(self, ctx: Context) -> None:
        self.pruner.setup(ctx)

    def _new_loop(self) -> dict[str, Any]:
        p = self.pruner
        p.rng = self.rng  # the search draws from the loop's generator, so a checkpoint holds both
        o: ChannelOptions = p.options  # type: ignore[assignment]
        dense = p.cost.dense(o.measure)
        return {"plan": [dense * o.budget ** ((i + 1) / o.rounds) for i in range(o.rounds)], "next": 0,
                "q": [int(v) for v in p.cost.size], "reference": self.reference, "accuracy": self.reference}

    def _step(self) -> RoundRecord:
        i = self.loop["next"]
        record = RoundRecord(self.pruner.round(self.ctx, i, self.loop["plan"][i], np.array(self.loop["q"], dtype=np.int64)))
        self.loop.update(q=record["q"], accuracy=record["accuracy_after_finetune"], next=i + 1)
        self._bar.update(1)
        return record

    def _outcome(self) -> Outcome:
        return self.pruner.outcome(self.ctx, np.array(self.loop["q"], dtype=np.int64), self.history, self.reference)


def channel_space(model: nn.Module, example: Any, targets: list[Target], o: ChannelOptions,
                  ) -> tuple[CoarseSpace, ChannelCost]:
    """The coupled groups ``de_channel`` searches (random_coarse's, every one at a placeholder ratio)
    and their closed-form cost."""
    producers = [t.module_name for t in targets if t.module_type in ("Conv2d", "Linear") and t.param_name == "weight"]
    if not any(t.module_type == "Conv2d" for t in targets) and not o.include_linear:
        raise ValueError("de_channel searches Conv2d feature maps (and Linear hidden units with include_linear=True): "
                         "the selection has no Conv2d layer (check `layers` / `layer_types` / `exclude`)")
    probe = CoarseOptions(feature_map_ratio=0.5, linear_ratio=0.5 if o.include_linear else 0.0, unresolved=o.unresolved)
    space = CoarseSpace(model, example, producers, probe)
    if not space.groups:
        raise ValueError("de_channel found no channel group it may prune: every selected layer's channels reach the "
                         "model's output, are normalised together (LayerNorm) or are excluded")
    return space, ChannelCost(model, space, example)


def _coarse(o: ChannelOptions) -> CoarseOptions:
    return CoarseOptions(feature_map_ratio=0.0, finetune_epochs=o.finetune_epochs, bn_batches=o.bn_batches)


def _example(ctx: Context) -> Any:
    """Two samples of the model's input from the data batches (no model call), or None."""
    for batches in (ctx.val_batches, ctx.train_batches):
        if batches:
            x = batches[0][0] if isinstance(batches[0], (tuple, list)) else batches[0]
            if isinstance(x, torch.Tensor):
                return x[:2]
    return None


@hookimpl
def register_pruners():
    return [DEChannel]
