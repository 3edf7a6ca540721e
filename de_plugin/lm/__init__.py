"""Causal language models: per-layer sparsity searched without retraining (:func:`prune_lm`).

Targets are the Linear layers of the decoder blocks (:mod:`.targets`); calibration is token batches
(:mod:`.calibration`); inside each layer the mask is magnitude, Wanda or SparseGPT (:mod:`.inlayer`,
served to the search by :mod:`.database`); candidates are scored by KL divergence from the dense
model (:mod:`.fitness`); the seeds are uniform and OWL (:mod:`.allocations`), and the curvature-weighted
allocation (:mod:`.sensitivity`) is a third one to choose without a search.
"""
from .allocations import owl_counts, owl_densities, uniform_counts
from .calibration import LayerStats, check_tokens, collect_stats, logits_of
from .database import LayerDatabase, SequentialPruning, prune_sequential
from .fitness import DenseReference, kl_score, perplexity
from .inlayer import METHODS, layer_mask, nm_mask, prune_weight, row_mask, sparsegpt
from .search import LMOptions, LMPruningResult, OneShotOptions, prune_lm
from .targets import LMLayer, decoder_layers, find_blocks

__all__ = [
    "owl_counts", "owl_densities", "uniform_counts", "LayerStats", "check_tokens", "collect_stats", "logits_of",
    "LayerDatabase", "SequentialPruning", "prune_sequential", "DenseReference", "kl_score", "perplexity", "METHODS", "layer_mask", "nm_mask", "prune_weight", "row_mask",
    "sparsegpt", "LMOptions", "LMPruningResult", "OneShotOptions", "prune_lm", "LMLayer", "decoder_layers", "find_blocks",
]
