"""The adapter API: the names a framework adapter (``de_plugin_nni``, ``de_plugin_inc``, a third
party's) may use from the core, and nothing else.

Adapters translate a framework's objects into these and back; everything behind them may change
without notice. The rule is checked by the test suite (import-linter contracts in
``.importlinter``): an adapter imports ``de_plugin.adapter`` (and ``de_plugin.hookspecs`` for its
hook) only, its own framework, and never another adapter.

* Whole runs: :func:`prune` (``de_plugin.prune``); the registry (:func:`list_pruners`,
  :func:`get_pruner_class`) so a framework offers every registered pruner, third parties' included:
  an :class:`IterativePruner` (per-layer keep-counts, weight masks) runs under any adapter's
  weight-mask wrapper.
* Rounds driven by the framework's schedule: :class:`Context` + :class:`RoundRunner` over a pruner
  from :func:`create_pruner` (``runner.start(ctx)``, ``runner.step(target_sparsity=...)``).
* One allocation with the framework's own masks: :func:`start_search` (the one search set-up: an
  :class:`Allocator` and its solver, fresh or resumed) over a :class:`Scorer` of the adapter's, on a backend from :func:`make_backend`, in a :class:`KeepSpace` / :class:`DensitySpace`
  (seen through :class:`GroupedSpace` and :func:`resolve_groups` for a grouped search).
* Coarse (channel / kernel) masks: :class:`CoarseSpace` + :func:`coarse_search`, then
  :func:`apply_and_retrain`; searched channel counts (``de_channel``) as a whole run through
  :func:`prune` with :class:`ChannelOptions`; :func:`slice_channels` makes either physically smaller.
* Causal language models: :func:`prune_lm` and its :class:`LMPruningResult` (per-layer sparsities to
  hand to a framework's LLM pruning), :func:`decoder_layers` / :func:`find_blocks`, :func:`check_tokens`,
  :func:`undone_on_error` (weights put back when pruning in place fails).
"""
from __future__ import annotations

from .weights import allocation
from .weights.allocation import masks_from_counts
from .search.allocator import Allocator, DensitySpace, KeepSpace, SearchOptions, search_state, start_search
from .channels.channel import ChannelOptions
from .channels.coarse import (CoarseOptions, CoarseSearch, CoarseSpace, apply_and_retrain, capture_input, coarse_search, count_macs)
from .channels.coupling import channel_groups
from .search.grouping import GroupedSpace, resolve_groups
from .evaluation import Backend, BackendOptions, BNState, Scorer, backend_round, check_batches, check_score, make_backend
from .hookspecs import hookimpl
from .channels.latency import measure as measure_latency
from .weights.layerwise import LayerwiseOptions
from .options import Options, options_from, validate_options
from .weights.patterns import PatternScorer, as_matrix, check_fits, parse_pattern, pattern_mask
from .pruner import Context, prune
from .lm import LMPruningResult, check_tokens, decoder_layers, find_blocks, prune_lm
from .lm.search import undone_on_error
from .registry import create_pruner, get_pruner_class, list_pruners, lookup
from .report import check_out_dir
from .result import PruningResult
from .weights.rounds import IterativePruner, RoundRunner
from .runner import RoundRecord
from .channels.slicing import kept_channels
from .channels.slicing import speedup as slice_channels
from .targets import Target, apply_masks, masks_attached

__all__ = [
    "prune", "PruningResult", "create_pruner", "list_pruners", "get_pruner_class", "IterativePruner", "Context", "RoundRunner", "RoundRecord", "Target", "masks_attached", "apply_masks",
    "Allocator", "start_search", "search_state", "KeepSpace", "DensitySpace", "GroupedSpace", "resolve_groups", "SearchOptions", "LayerwiseOptions", "allocation", "masks_from_counts",
    "Scorer", "Backend", "BackendOptions", "make_backend", "backend_round", "check_score", "check_batches", "validate_options", "options_from", "Options",
    "CoarseOptions", "CoarseSpace", "CoarseSearch", "coarse_search", "apply_and_retrain", "capture_input", "count_macs",
    "channel_groups", "slice_channels", "kept_channels", "check_out_dir", "ChannelOptions", "measure_latency", "BNState", "hookimpl", "lookup",
    "PatternScorer", "parse_pattern", "pattern_mask", "check_fits", "as_matrix",
    "prune_lm", "LMPruningResult", "decoder_layers", "find_blocks", "check_tokens", "undone_on_error",
]
