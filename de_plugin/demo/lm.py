"""A language-model test bed that needs no download: a GPT-2-architecture decoder trained on the
Python standard library's own source text, byte by byte.

* :func:`stdlib_corpus`: the ``.py`` files of this interpreter's standard library, split by file
  (every ``holdout``-th file in sorted order is held out for perplexity), as bytes (vocabulary 256).
* :class:`TinyGPT`: token + position embeddings, pre-LayerNorm blocks with causal self-attention
  (separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``) and a GELU MLP (``up_proj`` /
  ``down_proj``), a final LayerNorm and an untied output head; a plain ``nn.Module`` returning logits.
* :func:`dense_lm`: train it once (seeded) and cache the weights under ``~/.cache/de_plugin``.
* :func:`token_batches`: fixed-length windows of a byte stream as ``[batch, length]`` batches.

A model a user has on disk is loaded with ``transformers`` (``AutoModelForCausalLM.from_pretrained(path)``)
and tokenised with its tokenizer; :func:`de_plugin.lm.prune_lm` takes either.
"""
from __future__ import annotations

import logging
import math
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress_bar
from .training import CACHE

log = logging.getLogger("de_plugin")


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 byte stream of the training files
    heldout: torch.Tensor  # uint8 byte stream of the held-out files
    files: tuple[int, int]  # (training files, held-out files)


def stdlib_corpus(holdout: int = 10, limit_bytes: Optional[int] = None, root: Optional[str] = None) -> Corpus:
    """The standard library's ``.py`` sources (top level and packages, no tests), held out by file."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in base.rglob("*.py") if "test" not in p.relative_to(base).parts[0]
                   and "site-packages" not in p.parts and "idlelib" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no .py files under {base}: pass root= a folder of Python sources")
    train, held = bytearray(), bytearray()
    for i, p in enumerate(files):
        (held if i % holdout == holdout - 1 else train).extend(p.read_bytes() + b"\n")
    if limit_bytes:
        train, held = train[:limit_bytes], held[:max(1, limit_bytes // holdout)]
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).clone()  # noqa: E731
    return Corpus(as_tensor(train), as_tensor(held), (len(files) - len(files) // holdout, len(files) // holdout))


def token_batches(stream: torch.Tensor, batch: int, length: int, count: int, seed: int = 0,
                  contiguous: bool = False) -> list[torch.Tensor]:
    """``count`` batches of ``batch`` windows of ``length`` tokens: random offsets (seeded), or with
    ``contiguous`` the stream's consecutive windows from its start (held-out evaluation)."""
    n = len(stream) - length
    if contiguous:
        starts = torch.arange(0, batch * count) * length
        if int(starts[-1]) > n:
            raise ValueError(f"the stream has {len(stream)} tokens, fewer than {batch * count} windows of {length}")
    else:
        starts = torch.randint(0, n, (batch * count,), generator=torch.Generator().manual_seed(seed))
    idx = starts[:, None] + torch.arange(length)[None, :]
    return list(stream[idx].long().split(batch))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads  # heads may shrink (width pruning), head_dim does not
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.down_proj(F.gelu(self.up_proj(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-style decoder returning next-token logits ``[batch, length, vocab]``."""

    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 4, heads: int = 4, context: int = 128,
                 mlp: Optional[int] = None):
        super().__init__()
        self.context = context
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, mlp or 4 * d) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.context:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's context {self.context}")
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def train_lm(model: nn.Module, stream: torch.Tensor, steps: int, batch: int = 32, lr: float = 3e-3,
             seed: int = 0, progress: bool = True) -> nn.Module:
    """Next-token training on random windows of ``stream`` (AdamW, warm-up then cosine decay)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    bar = progress_bar(range(steps), desc="training the decoder", enabled=progress)
    for step in bar:
        (x,) = token_batches(stream, batch, model.context + 1, 1, seed=seed * 1_000_003 + step)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def dense_lm(steps: int = 3000, seed: int = 0, corpus: Optional[Corpus] = None, progress: bool = True,
             **model_kwargs) -> TinyGPT:
    """A :class:`TinyGPT` trained ``steps`` steps on the standard library's sources, cached by its
    settings and the Python version (whose standard library is the corpus)."""
    torch.manual_seed(seed)
    model = TinyGPT(**model_kwargs)
    extra = "".join(f"_{k}{v}" for k, v in sorted(model_kwargs.items()))
    path = CACHE / f"tinygpt_stdlib{sys.version_info[0]}{sys.version_info[1]}_t{steps}_s{seed}{extra}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        log.info("loaded cached decoder %s", path)
        return model.eval()
    corpus = corpus or stdlib_corpus()
    log.info("training the decoder for %d steps on %d bytes", steps, len(corpus.train))
    train_lm(model, corpus.train, steps, seed=seed, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model
