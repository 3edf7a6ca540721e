"""What INC 3.8+ and its dependencies print on every prune-and-quantize run, kept to what matters.

Quirks seen with neural-compressor-pt 3.10 / torchao on a CPU-only torch 2.13 (a 30-second run of
``examples/inc/prune_and_quantize_inc3.py`` printed 76 lines, 56 of them these):

* INC logs each PT2E step at INFO ("Preparation started.", "Start to convert model ...") and its
  half-precision pass logs "Found 0 matches." once per pattern (34 lines a run): INFO records of the
  ``neural_compressor`` logger are dropped unless ``de_plugin`` logs at DEBUG (``--verbose``).
* INC warns on every import that it found a CPU ("Auto detect accelerator: CPU_Accelerator"), that
  "hw aligned scales" are not supported there, and that a qdq model should be compiled: dropped.
* torchao warns "Failed to load .../_C_mxfp8...so" / "_C_cutlass_90a" at import: CUDA-only kernels a
  CPU build cannot load, which reads as an error and is none: dropped.
* torch's pytree warns that torchao's ``KernelPreference`` enum "is now natively supported", and
  ``torch.export`` that INC's save path does not end in ``.pt2``: dropped.
Every other warning or error of those libraries passes. INC warns as it is first imported: import
``de_plugin_inc`` before ``neural_compressor`` for those lines to be filtered too.
"""
from __future__ import annotations

import logging
import warnings

#: (logger, start of the message) pairs dropped at any level
_NOISE = (
    ("neural_compressor", "Auto detect accelerator"),
    ("neural_compressor", "hw aligned scales not supported"),
    ("neural_compressor", "Converted the model in qdq mode"),
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "<enum "),
    ("torch.export.pt2_archive._package", "Expect archive file"),
)


class _Quiet(logging.Filter):
    def __init__(self, logger: str):
        super().__init__()
        self.prefixes = tuple(p for name, p in _NOISE if name == logger)
        self.drop_info = logger == "neural_compressor"

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if any(msg.startswith(p) for p in self.prefixes):
            return False
        verbose = logging.getLogger("de_plugin").isEnabledFor(logging.DEBUG)
        return not (self.drop_info and record.levelno <= logging.INFO and not verbose)


def quiet_inc3() -> None:
    """Install the filters once (idempotent)."""
    for name in {n for n, _ in _NOISE}:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in lg.filters):
            lg.addFilter(_Quiet(name))
    # torch 2.13 + torchao: pickling INC's exported program warns about a deprecated treespec check
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
