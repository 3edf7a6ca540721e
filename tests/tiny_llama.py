"""A tiny Llama and a byte-level BPE tokenizer trained on a few standard-library files, written to a folder
as ``save_pretrained`` does: a "model on disk" for the tests, with nothing downloaded."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

FILES = ("textwrap.py", "shlex.py", "glob.py", "fnmatch.py", "bisect.py", "heapq.py", "string.py", "colorsys.py",
         "keyword.py", "queue.py")


def write_texts(folder: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in FILES:
        (folder / name).write_text((stdlib / name).read_text())
    return folder


def save_tiny_llama(folder: Path, texts: list[str], layers: int = 2, seed: int = 0) -> Path:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
