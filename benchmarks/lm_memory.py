"""Memory of ``prune_lm`` / ``prune_width`` on a larger decoder: peak resident memory beyond the model, per decoder weight.

A ``transformers`` Llama with random weights (no download; the numbers do not depend on what the weights are),
calibration of random token ids. Each cell runs in a fresh process so that its peak (``ru_maxrss``) is its own;
the baseline is the process's peak once the model and the calibration tokens exist, so "extra" is what the call
itself holds: the dense reference's log-probabilities, the database (dense copies, score orders, SparseGPT's
levels and Hessians), statistics, the undo copy. ``inplace=True`` throughout (a copy of the model is what it avoids).

    python benchmarks/lm_memory.py --cells wanda:search magnitude:search sparsegpt:uniform width:search \
        --out benchmarks/results/lm_memory
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("lm_memory")
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
         "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 256}


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cell(kind: str, mode: str, batches: int, generations: int) -> dict:
    import transformers
    from de_plugin.lm import decoder_layers, prune_lm
    from de_plugin.lm.width import prune_width

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, SHAPE["vocab_size"], (8, 128), generator=g) for _ in range(batches)]
    weights = sum(l.numel for l in decoder_layers(model))
    with torch.no_grad():
        model(calib[0])  # the forward's own buffers are part of the baseline, not of the call
    base = peak()
    start = time.perf_counter()
    # "search": EvoPress-style level switching; "guided": the level switches ranked by the Taylor estimate (prune_lm's
    # default where that estimate's 8 bytes per searched weight fit GUIDE_AUTO_BYTES)
    opts = {"generations": generations} if mode in ("search", "guided") else {"allocation": "uniform"}
    if kind != "width" and mode in ("search", "guided"):
        opts["search_strategy"] = "evopress" if mode == "search" else "guided"
    if kind == "width":
        r = prune_width(model, calib, 0.3, inplace=True, progress=False, **opts)
    else:
        r = prune_lm(model, calib, 0.5, method=kind, inplace=True, progress=False, **opts)
    return {"cell": f"{kind}:{mode}", "decoder_weights": weights, "model_bytes": 4 * sum(p.numel() for p in model.parameters()),
            "base_rss_gib": base / 2 ** 30, "peak_rss_gib": peak() / 2 ** 30,
            "extra_bytes_per_weight": (peak() - base) / weights, "evaluations": r.evaluations,
            "seconds": time.perf_counter() - start, "batches": batches}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", nargs="+", default=["wanda:search", "magnitude:search", "sparsegpt:uniform", "width:search"])
    ap.add_argument("--batches", type=int, default=2, help="calibration batches of 8 x 128 tokens")
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/lm_memory")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.one:
        kind, mode = args.one.split(":")
        print(json.dumps(cell(kind, mode, args.batches, args.generations)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    for c in args.cells:
        log.info("cell %s", c)
        out = subprocess.run([sys.executable, __file__, "--one", c, "--batches", str(args.batches), "--generations",
                              str(args.generations), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cells.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| cell | decoder weights | model | peak RSS | extra bytes per decoder weight | evaluations | s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['cell']} | {r['decoder_weights'] / 1e6:.1f} M | {r['model_bytes'] / 2 ** 30:.2f} GiB | "
              f"{r['peak_rss_gib']:.2f} GiB | {r['extra_bytes_per_weight']:.1f} | {r['evaluations']} | {r['seconds']:.0f} |"
              for r in rows]
    text = "\n".join(lines)
    print(text)
    (folder / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
