"""Compatibility of NNI 3.0's evaluators with current libraries (delete when NNI fixes them).

Quirk (nni 3.0 + pytorch-lightning 2.x): ``LightningEvaluator.train`` sets
``trainer.fit_loop.max_steps``, which became a read-only property
(``AttributeError: property 'max_steps' of '_FitLoop' object has no setter``, evaluator.py:633)
as soon as a pruner trains. The patched ``train`` sets ``trainer.fit_loop.epoch_loop.max_steps``.
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

    ev.LightningEvaluator.train = train
    _PATCHED = True
