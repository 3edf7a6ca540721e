"""Evaluating candidates: checked scores and batches (:mod:`.batches`), adaptive BatchNorm
(:mod:`.batchnorm`) and the backends that score many candidates serially, batched, in processes or on
Ray (:mod:`.backends`). The names are re-exported here."""
from .backends import (BACKENDS, Backend, BackendOptions, BatchedBackend, ProcessBackend, RayBackend, Scorer,
                       SerialBackend, WorkerError, backend_round, finish_round, make_backend)
from .batches import (LOW_MEMORY_AUTO, REJECT_MARGIN, Bound, DeviceBatches, check_batches, check_device, check_score,
                      evaluator_from_batches, inference, low_memory_for, metric_on_batches)
from .batchnorm import BN_TYPES, BNState, batch_norms, recalibrate_bn

__all__ = [
    "BACKENDS", "Backend", "BackendOptions", "BatchedBackend", "ProcessBackend", "RayBackend", "Scorer",
    "SerialBackend", "WorkerError", "backend_round", "finish_round", "make_backend", "LOW_MEMORY_AUTO",
    "REJECT_MARGIN", "Bound", "DeviceBatches", "check_batches", "check_device", "check_score",
    "evaluator_from_batches", "inference", "low_memory_for", "metric_on_batches", "BN_TYPES", "BNState",
    "batch_norms", "recalibrate_bn",
]
