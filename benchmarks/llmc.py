"""The searched per-block sparsity inside llm-compressor's own one-shot pipeline, against its uniform and OWL profiles.

Runs in llm-compressor's environment (``.venv-llmc``: it pins transformers <= 5.17). The dense model is a
Llama (``transformers.LlamaForCausalLM``: 4 decoder layers, hidden 128, SwiGLU 352, 4 query / 2 key-value
heads, context 128, untied head) with a byte-level BPE tokenizer (512 tokens), both trained here on the Python
standard library's sources (every 10th file held out), ``--steps`` steps, cached under ``~/.cache/de_plugin`` as
a ``save_pretrained`` folder: the kind of model folder a user hands llm-compressor.

Per seed: ``--calib-batches`` batches of 8 x 128 tokens drawn from the training files; every profile is then
applied by ``llmcompressor.oneshot`` with ``WandaPruningModifier`` or ``SparseGPTModifier`` (targets the decoder
layers, ``lm_head`` ignored) on those same sequences, and held-out perplexity is measured on ``--eval-batches``
consecutive held-out windows of 8 x 128 tokens. Profiles (one sparsity per decoder layer, llm-compressor's
``sparsity`` list):

* ``uniform``: ``sparsity=S``;
* ``owl[llmc]``: llm-compressor's own OWL (``sparsity_profile="owl"``, ``owl_m=5``, ``owl_lmbda=0.08``);
* ``owl``: ``prune_lm(allocation="owl").block_sparsity()`` (the same rule, computed by this project);
* ``search``: ``prune_lm(granularity="block").block_sparsity()`` at the library's defaults, the same in-layer
  method as the modifier;
* ``search[layer]``: ``prune_lm``'s per-layer search, EvoPress-style (``search_strategy="evopress"``), every decoder
  Linear its own target (``result.modifier_targets()``: exact-name patterns and one sparsity each).

Beside them, not through llm-compressor: ``prune_lm`` itself (``direct[...]``: its per-layer EvoPress-style search and
its uniform and OWL), pruned by the project's own Wanda / SparseGPT.
``--widths``: ``prune_width`` on the same model (heads pruned as one key / value head with its two query heads,
and the MLP's hidden units; ``[mlp]``: hidden units only), uniform or searched widths, with and without the
least-squares refit. Ratios of held-out perplexity are paired over seeds
(geometric mean, 95% t-interval of the log ratio).

    .venv-llmc/bin/python benchmarks/llmc.py --sparsities 0.7 --modifiers wanda sparsegpt --seeds 0 1 2 --threads 1
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cells import Cells  # noqa: E402
from llm import ratio_lines  # noqa: E402

from de_plugin.demo.lm import Corpus, stdlib_corpus, token_batches, train_lm  # noqa: E402
from de_plugin.demo.training import CACHE  # noqa: E402
from de_plugin.lm import perplexity, prune_lm  # noqa: E402
from de_plugin.lm.width import prune_width  # noqa: E402

log = logging.getLogger("llmc")
PROFILES = ("uniform", "owl[llmc]", "owl", "search", "search[layer]")
DIRECT = ("direct[uniform]", "direct[owl]", "direct[search]")
OWL_M, OWL_LAMBDA = 5, 0.08  # the OWL paper's settings, prune_lm's defaults
MODIFIERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}
#: ``--widths``: ``prune_width`` on the same Llama: key / value heads with their query heads, and hidden units
WIDTHS = {"uniform": {"allocation": "uniform", "refit": False}, "search": {"refit": False},
          "uniform+refit": {"allocation": "uniform", "refit": True}, "search+refit": {"refit": True},
          # the refit of the final widths only: what refit=None does when the moments would not fit in memory
          "search+final": {"refit": "final"}}
WIDTHS |= {a + "[mlp]": {**o, "heads": False} for a, o in list(WIDTHS.items())}  # the MLP's hidden units only


class Logits(nn.Module):
    """A ``transformers`` causal LM as ``train_lm`` trains it: token ids in, logits out."""

    def __init__(self, lm: nn.Module, context: int):
        super().__init__()
        self.lm, self.context = lm, context

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm(tokens).logits


def tokenized(corpus: Corpus, folder: Path) -> tuple[object, torch.Tensor, torch.Tensor]:
    """A byte-level BPE tokenizer (512 tokens) trained on the training files, and both streams as token ids."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = lambda s: bytes(s.numpy()).decode("utf-8", "replace")  # noqa: E731
    chunks = lambda t: [t[i:i + 100_000] for i in range(0, len(t), 100_000)]  # noqa: E731
    train, held = text(corpus.train), text(corpus.heldout)
    if not (folder / "tokenizer.json").exists():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(chunks(train), trainers.BpeTrainer(
            vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = lambda t: torch.tensor([i for e in tokenizer.backend_tokenizer.encode_batch(chunks(t))  # noqa: E731
                                  for i in e.ids], dtype=torch.long)
    return tokenizer, ids(train), ids(held)


def dense_llama(steps: int, corpus: Corpus, progress: bool = True) -> tuple[Path, object, torch.Tensor, torch.Tensor]:
    """The trained Llama's folder (trained once, cached), its tokenizer and the two token streams."""
    import transformers

    folder = CACHE / f"llama_stdlib{sys.version_info[0]}{sys.version_info[1]}_bpe512_d128_l4_t{steps}_s0"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, train, held = tokenized(corpus, folder)
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352,
                                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=128, tie_word_embeddings=False)
        lm = transformers.LlamaForCausalLM(cfg)
        log.info("training the Llama for %d steps on %d tokens", steps, len(train))
        train_lm(Logits(lm, 128), train, steps, lr=3e-3, seed=0, progress=progress)
        lm.save_pretrained(folder)
    return folder, tokenizer, train, held


def llmc_prune(folder: Path, tokenizer, calib: list[torch.Tensor], modifier: str, sparsity, owl: bool = False,
               targets: Optional[list[str]] = None):
    """The dense model from ``folder`` pruned by ``llmcompressor.oneshot`` with one modifier: ``sparsity`` a
    fraction or one per target (the decoder layers, or ``targets``); ``owl``: llm-compressor's own OWL profile
    around the fraction."""
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers import pruning

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = [r.tolist() for b in calib for r in b]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    extra = {"sparsity_profile": "owl", "owl_m": OWL_M, "owl_lmbda": OWL_LAMBDA} if owl else {}
    recipe = getattr(pruning, MODIFIERS[modifier])(sparsity=sparsity, targets=targets or ["LlamaDecoderLayer"],
                                                   ignore=["re:.*lm_head"], **extra)
    oneshot(model=model, dataset=ds, recipe=recipe, processor=tokenizer, num_calibration_samples=len(rows),
            max_seq_length=calib[0].shape[1])
    return model


def run_cell(folder: Path, tokenizer, calib, held, modifier: str, profile: str, sparsity: float, seed: int) -> dict:
    start = time.perf_counter()
    dense = lambda: __import__("transformers").AutoModelForCausalLM.from_pretrained(folder).eval()  # noqa: E731
    cell: dict = {}
    if profile.startswith("direct["):
        alloc = profile[len("direct["):-1]
        r = prune_lm(dense(), calib, sparsity, method=modifier, allocation=alloc, seed=seed, progress=False, inplace=True,
                     **({"search_strategy": "evopress"} if alloc == "search" else {}))
        model, cell["block_sparsity"], cell["evaluations"] = r.model, r.block_sparsity(), r.evaluations
    elif profile == "owl[llmc]":
        try:
            model = llmc_prune(folder, tokenizer, calib, modifier, sparsity, owl=True)
        except Exception as e:  # noqa: BLE001 - what the user would see is the measurement
            return {"error": f"{type(e).__name__}: {e}"[:300], "wall_seconds": time.perf_counter() - start}
    elif profile == "search[layer]":
        r = prune_lm(dense(), calib, sparsity, method=modifier, seed=seed, progress=False, inplace=True,
                     search_strategy="evopress")
        spec, cell["evaluations"] = r.modifier_targets(), r.evaluations
        model = llmc_prune(folder, tokenizer, calib, modifier, spec["sparsity"], targets=spec["targets"])
        cell["block_sparsity"] = r.block_sparsity()
    else:
        target = sparsity
        if profile in ("owl", "search"):
            r = prune_lm(dense(), calib, sparsity, method=modifier, allocation=profile, granularity="block",
                         seed=seed, progress=False, inplace=True)
            target, cell["evaluations"] = r.block_sparsity(), r.evaluations
        model = llmc_prune(folder, tokenizer, calib, modifier, target)
        cell["block_sparsity"] = target if isinstance(target, list) else None
    cell.update(ppl=perplexity(model, held), sparsity=achieved(model), wall_seconds=time.perf_counter() - start)
    return cell


def run_width(folder: Path, calib, held, profile: str, share: float, seed: int) -> dict:
    import transformers

    start = time.perf_counter()
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    r = prune_width(dense, calib, share, seed=seed, progress=False, **WIDTHS[profile])
    return {"ppl": perplexity(r.model, held), "removed": r.removed, "units": r.units, "heads": r.heads,
            "evaluations": r.evaluations, "wall_seconds": time.perf_counter() - start}


def width_table(cells: Cells, shares, seeds) -> str:
    lines = ["| parameters removed | allocation | perplexity per seed | mean | query heads kept per layer (seed 0) | "
             "hidden units kept per layer (seed 0) |", "|---|---|---|---|---|---|"]
    got: dict = {}
    for r in shares:
        for p in WIDTHS:
            cs = {sd: c for sd in seeds if (c := cells.get(("width", r, p, sd)))}
            if cs:
                got[("width", r, p)] = {sd: c["ppl"] for sd, c in cs.items()}
                per = " / ".join(f"{c['ppl']:.3f}" for c in cs.values())
                lines.append(f"| {r:.0%} | {p} | {per} | "
                             f"{sum(c['ppl'] for c in cs.values()) / len(cs):.3f} | {cs[min(cs)]['heads']} | "
                             f"{cs[min(cs)]['units']} |")
    pairs = [(a + m, b + m) for m in ("", "[mlp]") for a, b in
             (("search", "uniform"), ("uniform+refit", "uniform"), ("search+refit", "uniform+refit"),
              ("search+refit", "uniform"), ("search+refit", "search"), ("search+final", "uniform+refit"),
              ("search+final", "search+refit"), ("search+final", "uniform"))] + [("search+refit", "search+refit[mlp]")]
    return "\n".join(lines + [""] + ratio_lines(got, ["width"], shares, pairs))


def achieved(model: nn.Module) -> float:
    """The share of zero weights over the decoder layers' Linear weights."""
    from de_plugin.lm import decoder_layers

    layers = decoder_layers(model)
    return 1.0 - sum(int((l.weight != 0).sum()) for l in layers) / sum(l.numel for l in layers)


#: the ratios the table lists (numerator, denominator), where both were measured
PAIRS = [("search", "uniform"), ("search", "owl"), ("search", "owl[llmc]"), ("owl", "uniform"),
         ("search[layer]", "uniform"), ("search[layer]", "owl"), ("search[layer]", "search"),
         ("direct[search]", "search[layer]"), ("direct[search]", "direct[owl]"), ("direct[owl]", "owl"),
         ("direct[search]", "direct[uniform]"),
         ("owl[llmc]", "uniform"), ("direct[search]", "search"), ("direct[uniform]", "uniform")]


def table(cells: Cells, modifiers, rungs, profiles, seeds, dense_ppl: float) -> str:
    lines = [f"dense held-out perplexity {dense_ppl:.3f} (per BPE token)", "",
             "| modifier | sparsity | profile | perplexity per seed | mean | sparsity reached | wall s |",
             "|---|---|---|---|---|---|---|"]
    got: dict = {}
    for m in modifiers:
        for s in rungs:
            for p in profiles:
                cs = {sd: cells.get((m, s, p, sd)) for sd in seeds}
                cs = {sd: c for sd, c in cs.items() if c}
                if not cs:
                    continue
                if any("error" in c for c in cs.values()):
                    err = next(c["error"] for c in cs.values() if "error" in c)
                    lines.append(f"| {m} | {s} | {p} | fails: {err.splitlines()[0][:120]} | - | - | - |")
                    continue
                got[(m, s, p)] = {sd: c["ppl"] for sd, c in cs.items()}
                per = " / ".join(f"{c['ppl']:.3f}" for c in cs.values())
                mean = lambda k: sum(c[k] for c in cs.values()) / len(cs)  # noqa: E731
                lines.append(f"| {m} | {s} | {p} | {per} | {mean('ppl'):.3f} | {mean('sparsity'):.4f} | "
                             f"{mean('wall_seconds'):.0f} |")
    lines += ["", "Held-out perplexity ratios, paired over seeds:", ""]
    lines += ratio_lines(got, modifiers, rungs, PAIRS)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000, help="dense training steps (cached)")
    ap.add_argument("--modifiers", nargs="+", default=["wanda", "sparsegpt"], choices=list(MODIFIERS))
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.7])
    ap.add_argument("--profiles", nargs="+", default=list(PROFILES + DIRECT), choices=list(PROFILES + DIRECT))
    ap.add_argument("--widths", nargs="*", type=float, default=[], help="shares of the decoder's parameters removed "
                                                                          "by prune_width (hidden units)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calib-batches", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/llmc")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("llmcompressor", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    silence_loguru()
    torch.set_num_threads(args.threads)
    folder, tokenizer, train, held_stream = dense_llama(args.steps, stdlib_corpus())
    held = token_batches(held_stream, 8, 128, args.eval_batches, contiguous=True)
    import transformers
    dense_ppl = perplexity(transformers.AutoModelForCausalLM.from_pretrained(folder).eval(), held)
    out = Path(args.out)
    cells = Cells(out / "cells.json", {"steps": args.steps, "calib_batches": args.calib_batches,
                                       "eval_batches": args.eval_batches, "dense_ppl": round(dense_ppl, 4)})
    for seed in args.seeds:
        calib = token_batches(train, 8, 128, args.calib_batches, seed=1000 + seed)
        for s in args.sparsities:
            for m in args.modifiers:
                for p in args.profiles:
                    log.info("cell %s @%s %s seed %d", m, s, p, seed)
                    cells.run((m, s, p, seed), lambda: run_cell(folder, tokenizer, calib, held, m, p, s, seed))
        for r in args.widths:
            for p in WIDTHS:
                log.info("cell width %s %s seed %d", r, p, seed)
                cells.run(("width", r, p, seed), lambda: run_width(folder, calib, held, p, r, seed))
    text = table(cells, args.modifiers, args.sparsities, args.profiles, args.seeds, dense_ppl)
    if args.widths:
        text += "\n\nWidth (prune_width; MLP hidden units):\n\n" + width_table(cells, args.widths, args.seeds)
    print(text)
    (out / "table.md").write_text(text + "\n")


def silence_loguru() -> None:
    """llm-compressor 0.14 logs every module it prunes (loguru, INFO) and reconfigures its logger on each
    ``oneshot``: only its environment variable keeps the table readable."""
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")


if __name__ == "__main__":
    main()
