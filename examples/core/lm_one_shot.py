"""One-shot pruning of a small language model: searched per-layer sparsity against uniform, OWL and fisher,
then width pruning, then INC 3.7's own SparseGPT at the searched per-layer targets.

The decoder is TinyGPT trained on this Python's standard-library sources (``--steps``; cached under
``~/.cache/de_plugin``: 3,000 steps take about 12 minutes on one CPU core the first time, 600 about 2.5).
The rest takes about 80 seconds on one core (four allocations, width with its refit, INC's SparseGPT pass).

    python examples/core/lm_one_shot.py --steps 600 --sparsity 0.7
"""
import argparse
import copy
import logging

import torch

from de_plugin import prune_lm
from de_plugin.demo.lm import dense_lm, stdlib_corpus, token_batches
from de_plugin.lm import perplexity
from de_plugin.lm.width import prune_width


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    corpus = stdlib_corpus()
    model = dense_lm(steps=args.steps, corpus=corpus)
    calib = token_batches(corpus.train, 8, 128, 16, seed=0)
    held = token_batches(corpus.heldout, 8, 128, 40, contiguous=True)
    print(f"dense: held-out perplexity {perplexity(model, held):.3f} (bytes)")
    for allocation in ("uniform", "owl", "fisher", "search"):
        r = prune_lm(model, calib, args.sparsity, method=args.method, allocation=allocation)
        print(f"{allocation:>8}: sparsity {r.sparsity:.3f}, calibration KL {r.fitness:.4f}, "
              f"held-out perplexity {perplexity(r.model, held):.3f}, {r.evaluations} evaluations")
    print(r.table())
    w = prune_width(model, calib, params=0.3)
    print(f"width: {w.removed:.1%} of the decoder's parameters removed, heads {w.heads}, hidden units {w.units}, "
          f"held-out perplexity {perplexity(w.model, held):.3f}")
    try:
        import de_plugin_inc
        inc_model = copy.deepcopy(model)
        de_plugin_inc.prune_with_inc(inc_model, prune_lm(model, calib, args.sparsity, method="sparsegpt"), calib)
        print(f"INC 3.7 SparseGPT at the searched targets: held-out perplexity {perplexity(inc_model, held):.3f}")
    except ImportError as exc:
        print(f"INC route skipped: {exc}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
