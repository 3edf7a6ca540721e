"""Readable output of a run: per-layer table, storage of the sparse weights, JSON and plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .result import PruningResult


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """The output folder of a command, refused before any work if it already holds a result (a
    finished run is never overwritten silently)."""
    out = Path(out)
    previous = out / "result.json"
    if previous.exists() and not overwrite:
        raise ValueError(f"{previous} already holds a result: choose another folder with --out DIR, or pass "
                         "--overwrite to replace it")
    return out


def storage_bytes(mask: torch.Tensor, value_bytes: int = 4, index_bytes: int = 4) -> dict[str, int]:
    """Bytes for one weight tensor: dense, bitmask + values, CSR (rows = output units)."""
    n = mask.numel()
    kept = int(mask.sum())
    rows = mask.shape[0] if mask.dim() > 1 else 1
    return {
        "dense": n * value_bytes,
        "bitmask": math.ceil(n / 8) + kept * value_bytes,
        "csr": kept * (value_bytes + index_bytes) + (rows + 1) * index_bytes,
    }


def storage_summary(result: PruningResult, model: nn.Module | None = None) -> dict[str, Any]:
    """Storage of the pruned layers (fp32), and of the whole model (other parameters dense)."""
    per = {k: storage_bytes(m) for k, m in result.masks.items()}
    pruned = {enc: sum(p[enc] for p in per.values()) for enc in ("dense", "bitmask", "csr")}
    pruned["best_sparse"] = min(pruned["bitmask"], pruned["csr"])
    out: dict[str, Any] = {"pruned_layers_bytes": pruned}
    model = model if model is not None else result.model
    if model is not None:
        rest = sum(p.numel() * 4 for n, p in model.named_parameters() if n not in result.masks)
        total_params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in model.parameters())
        out["whole_model"] = {
            "params": total_params,
            "nonzero_params": nonzero,
            "sparsity": 1.0 - nonzero / total_params,
            "dense_bytes": total_params * 4,
            "sparse_bytes": pruned["best_sparse"] + rest,
        }
    return out


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def format_table(result: PruningResult, extra: dict[str, Any] | None = None) -> str:
    """A plain-text report: per-layer table then the headline numbers."""
    rows = [("layer", "type", "params", "kept", "sparsity")]
    for L in result.layers:
        rows.append((L["name"], L["type"], str(L["params"]), str(L["kept"]), f"{L['sparsity']:.4f}"))
    total = sum(L["params"] for L in result.layers)
    kept = sum(L["kept"] for L in result.layers)
    rows.append(("total (pruned layers)", "", str(total), str(kept), f"{result.sparsity:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    line = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [line(rows[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]]
    out.append("")
    out.append(f"compression (pruned layers): {result.compression:.1f}x  (sparsity {result.sparsity:.2%})")
    if result.reference_accuracy is not None and result.accuracy is not None:
        out.append(f"validation accuracy: dense {result.reference_accuracy:.4f} -> pruned {result.accuracy:.4f} "
                   f"(drop {100 * (result.reference_accuracy - result.accuracy):+.2f} pp)")
    search = sum(h.get("search_seconds", 0.0) for h in result.history)
    tune = sum(h.get("finetune_seconds", 0.0) for h in result.history)
    share = f", {100 * search / result.wall_time:.0f}% of the run" if result.wall_time else ""
    out.append(f"time: {result.wall_time:.1f} s in all; search {search:.1f} s ({result.nfev} evaluations{share}), "
               f"pruning + fine-tuning {tune:.1f} s, the rest reference and bookkeeping")
    st = storage_summary(result)
    p = st["pruned_layers_bytes"]
    out.append(f"storage of pruned layers: dense fp32 {_fmt_bytes(p['dense'])}, bitmask+values {_fmt_bytes(p['bitmask'])}, "
               f"CSR {_fmt_bytes(p['csr'])} ({p['dense'] / p['best_sparse']:.1f}x smaller)")
    if "whole_model" in st:
        w = st["whole_model"]
        out.append(f"whole model (all parameters): {w['params']} params, sparsity {w['sparsity']:.2%}, "
                   f"{_fmt_bytes(w['dense_bytes'])} dense -> {_fmt_bytes(w['sparse_bytes'])} sparse")
    out.append("note: weight-level masks do not make a dense model faster; the gain is storage.")
    for k, v in (extra or {}).items():
        out.append(f"{k}: {v}")
    return "\n".join(out)


def write_report(result: PruningResult, out_dir: str | Path, extra: dict[str, Any] | None = None,
                 text_extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``result.json`` (with ``extra``), ``report.txt`` (with ``text_extra``, labelled for a
    reader; ``extra`` when not given) and ``report.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = result.summary()
    summary["storage"] = storage_summary(result)
    summary.update(extra or {})
    paths = {"json": out / "result.json", "text": out / "report.txt", "plot": out / "report.png"}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str))
    paths["text"].write_text(format_table(result, extra if text_extra is None else text_extra) + "\n")
    plot_result(result, paths["plot"])
    return paths


def plot_result(result: PruningResult, path: str | Path) -> None:
    """Per-layer sparsity (bars) and, for searched runs, best fitness per DE generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    rounds = [h for h in result.history if isinstance(h.get("de"), dict)]
    fig, axes = plt.subplots(1, 2 if rounds else 1, figsize=(11 if rounds else 6, 4))
    axes = axes if rounds else [axes]
    names = [L["name"] for L in result.layers]
    values = [L["sparsity"] for L in result.layers]
    bars = axes[0].bar(range(len(names)), values, color="tab:blue")
    axes[0].bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7)
    axes[0].set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes[0].set_ylim(0, 1.08)
    axes[0].set_ylabel("sparsity of the layer's weights")
    acc = "" if result.accuracy is None else f", val acc {result.accuracy:.4f}"
    axes[0].set_title(f"{result.pruner}: {result.compression:.1f}x overall{acc}")
    if rounds:
        for h in rounds:
            best = h["de"]["history"]
            # budget form: the fitness is -accuracy; accuracy form: the kept fraction (lower is better)
            ys = [-v for v in best] if all(v <= 0 for v in best) else best
            axes[1].plot(range(len(ys)), ys, marker="o", ms=3,
                         label=f"round {h['round']}: {100 * h.get('target_sparsity', h['sparsity']):.1f}% sparse")
        forms = all(all(v <= 0 for v in h["de"]["history"]) for h in rounds)
        axes[1].set_xlabel("DE generation")
        axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].set_ylabel("best validation accuracy" if forms else "best fitness (kept fraction, lower is better)")
        axes[1].set_title("search progress per round (before fine-tuning)")
        axes[1].legend(fontsize=8, title="round: target", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
