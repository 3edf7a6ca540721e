"""Compatibility of NNI 3.0's evaluators with current libraries (delete when NNI fixes them).

Quirk (nni 3.0 + pytorch-lightning 2.x): ``LightningEvaluator.train`` sets
``trainer.fit_loop.max_steps``, which became a read-only property
(``AttributeError: property 'max_steps' of '_FitLoop' object has no setter``, evaluator.py:633)
as soon as a pruner trains. The patched ``train`` sets ``trainer.fit_loop.epoch_loop.max_steps``.

Quirk (nni 3.0): ``LightningEvaluator.evaluate`` ends with ``self.model.trainer = None``. Called by a
schedule (AGP / Linear) inside ``trainer.fit``, that detaches the running fit's trainer ("... is
not attached to a `Trainer`"); the patched ``evaluate`` puts back the trainer it found.

Quirk (nni 3.0 + pytorch-lightning 2.x): ``trainer.test`` runs under ``torch.inference_mode``; an
evaluation while a quantizer's wrappers are live (``LsqQuantizer`` fused with a pruner) turns the
scale / zero point they create into inference tensors ("Inplace update to inference tensor
outside InferenceMode"). The patched ``evaluate`` tests under ``no_grad`` instead.
"""
from __future__ import annotations

_PATCHED = False


def patch_lightning_evaluator() -> None:
    """Replace ``LightningEvaluator.train`` once (idempotent); a no-op without pytorch-lightning."""
    global _PATCHED
    if _PATCHED:
        return
    from nni.compression.utils import evaluator as ev

    if not getattr(ev, "LIGHTNING_INSTALLED", False):
        return

    def train(self, max_steps: int | None = None, max_epochs: int | None = None):
        trainer = self.trainer.trace_copy().get()
        trainer.num_sanity_val_steps = 0
        if max_steps:
            trainer.fit_loop.epoch_loop.max_steps = max_steps
        if max_epochs:
            trainer.fit_loop.max_epochs = max_epochs
        trainer.fit(self.model, self.data_module)
        self.model.trainer = None

    def evaluate(self):
        trainer = self.trainer.trace_copy().get()
        trainer.test_loop.inference_mode = False  # no_grad, not inference_mode (see the module docstring)
        attached = self.model._trainer
        try:
            results = trainer.test(self.model, self.data_module)
        finally:
            self.model.trainer = attached  # None outside a fit, as NNI leaves it; the fit's trainer inside
        metrics = [m["default"] for m in results if "default" in m]
        return (sum(metrics) / len(metrics) if metrics else None), results

    ev.LightningEvaluator.train = train
    ev.LightningEvaluator.evaluate = evaluate
    _PATCHED = True
