"""Prune a causal language model you have on disk (any `transformers` folder: GPT-2, Llama, Mistral, OPT, ...)
in one shot and save the pruned model beside it.

The model and its tokenizer are read from ``MODEL`` (a folder holding ``config.json``, the weights and the
tokenizer files, as ``save_pretrained`` writes it); calibration and held-out text come from ``--text``
(files or folders; by default this Python's standard-library sources, every 10th file held out). The
searched allocation is compared with uniform, OWL and fisher on held-out perplexity, and the pruned model is
written to ``--out`` with ``save_pretrained`` (the zeros are in the weights; a sparse kernel or INC /
llm-compressor's packing is what turns them into speed). ``MODEL`` is only read.

Time: the search forwards about 900 calibration batches (832 candidates on one batch each, then its finalists
on all), plus the uniform, OWL and fisher passes; on the tests' 2-block Llama (32 wide) the whole run takes seconds on one
core, on a 1B-parameter model expect hours on a CPU (use ``--no-compare`` and fewer ``--batches``).

    python examples/core/prune_hf_lm.py ~/models/my-llama --sparsity 0.5 --method wanda --out pruned-llama
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import sysconfig
from pathlib import Path
from typing import Optional, Sequence

import torch

from de_plugin import prune_lm
from de_plugin.demo.lm import token_batches
from de_plugin.lm import perplexity

SUFFIXES = (".py", ".txt", ".md", ".rst")


def check_args(args: argparse.Namespace) -> None:
    """Everything wrong with the call, said before the model is read."""
    model = Path(args.model).expanduser()
    if not (model / "config.json").is_file():
        raise SystemExit(f"{model} is not a transformers model folder (no config.json): give the folder "
                         "save_pretrained wrote, e.g. ~/models/my-llama")
    out = Path(args.out).expanduser()
    if out.resolve() == model.resolve():
        raise SystemExit(f"--out {out} is the model's own folder: give another folder (the model is only read)")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} exists and is not empty: give a new folder (nothing there is overwritten)")
    for t in args.text or []:
        if not Path(t).exists():
            raise SystemExit(f"--text {t} does not exist: give text files or folders of them")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("this example reads the model with transformers: pip install -e '.[lm]'") from None


def read_text(paths: Optional[Sequence[str]], holdout: int = 10, limit: int = 4_000_000) -> tuple[str, str]:
    """(calibration text, held-out text): every ``holdout``-th file held out, ``limit`` characters each."""
    roots = [Path(p) for p in paths] if paths else [Path(sysconfig.get_paths()["stdlib"])]
    files = sorted(f for r in roots for f in ([r] if r.is_file() else r.rglob("*"))
                   if f.is_file() and (r.is_file() or f.suffix in SUFFIXES))
    if len(files) < 2:
        raise SystemExit(f"--text holds {len(files)} readable file(s): give at least two (one is held out)")
    train: list[str] = []
    held: list[str] = []
    for i, f in enumerate(files):
        part = held if i % holdout == holdout - 1 or (i == len(files) - 1 and not held) else train
        if sum(map(len, part)) < limit:
            part.append(f.read_text(errors="replace"))
    return "\n".join(train)[:limit], "\n".join(held)[:limit]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a transformers model folder (config.json, weights, tokenizer)")
    ap.add_argument("--out", required=True, help="a new folder for the pruned model")
    ap.add_argument("--text", nargs="*", help="calibration / held-out text: files or folders (default: the stdlib)")
    ap.add_argument("--sparsity", default="0.5", help="a fraction of the decoder's Linear weights, or N:M such as 2:4")
    ap.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--batches", type=int, default=16, help="calibration batches")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch")
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches for perplexity")
    ap.add_argument("--no-compare", action="store_true", help="skip the uniform, OWL and fisher allocations")
    ap.add_argument("--sequential", action="store_true",
                    help="prune block by block on the pruned blocks' outputs (the SparseGPT / Wanda papers' order)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    check_args(args)
    sparsity = args.sparsity if ":" in args.sparsity else float(args.sparsity)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    train, held = read_text(args.text)
    ids = lambda s: torch.tensor(tokenizer(s).input_ids, dtype=torch.long)  # noqa: E731
    try:
        calib = token_batches(ids(train), args.batch, args.length, args.batches, seed=args.seed)
        held_batches = token_batches(ids(held), args.batch, args.length, args.eval_batches, contiguous=True)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"too little text for {args.batches} calibration and {args.eval_batches} held-out batches "
                         f"of {args.batch} x {args.length} tokens ({e}): give more --text, or lower --eval-batches "
                         "/ --batch / --length") from None
    report = {"dense_perplexity": perplexity(model, held_batches)}
    allocations = ["search"] if args.no_compare or isinstance(sparsity, str) else ["uniform", "owl", "fisher", "search"]
    for allocation in allocations:
        r = prune_lm(model, calib, sparsity, method=args.method, allocation=allocation, seed=args.seed,
                     sequential=args.sequential)
        report[allocation] = {"perplexity": perplexity(r.model, held_batches), "calibration_kl": r.fitness,
                              "sparsity": r.sparsity, "evaluations": r.evaluations}
        print(f"{allocation:>8}: held-out perplexity {report[allocation]['perplexity']:.3f} "
              f"(dense {report['dense_perplexity']:.3f}), calibration KL {r.fitness:.4f}")
    print(r.table())
    out = Path(args.out).expanduser()
    r.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    report.update(layer_sparsity=r.layer_sparsity, block_sparsity=r.block_sparsity(), method=args.method,
                  sequential=args.sequential)
    (out / "pruning.json").write_text(json.dumps(report, indent=1))
    print(f"saved to {out} (per-layer sparsity and perplexities in pruning.json)")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
