"""samopt in PyTorch Lightning: :class:`SAMModule`, a ``LightningModule`` base with manual optimisation.

Lightning's automatic optimisation calls ``optimizer.step(closure)`` and, with fp16,
``scaler.step(optimizer)`` without a closure, which no two-pass optimizer can honour.
:class:`SAMModule` switches to manual optimisation and runs the SAM update itself:

- ``training_step`` computes :meth:`SAMModule.sam_loss` on the batch at ``w`` and
  backpropagates it through ``manual_backward`` (so Lightning's precision plugin scales
  fp16 losses and autocasts the forward);
- every ``accumulate_grad_batches`` batches (and at the end of an epoch) it calls
  :meth:`samopt.SAM.first_step`, recomputes the losses of the window's batches at
  ``w + e``, calls :meth:`samopt.SAM.second_step` and updates the fp16 scaler; an
  overflow skips the update. As in Lightning's own accumulation, each batch's loss is
  divided by ``accumulate_grad_batches``, in a shorter last window of an epoch too;
- LR schedulers from ``configure_optimizers`` step after each update (``interval``
  ``"step"``) or each epoch; ``global_step`` counts updates, as Lightning's own loop does.

Checkpoints are Lightning's: ``SAM.state_dict()`` holds the base optimizer, masks and
their RNG; the fp16 scaler is saved by the precision plugin.

Example::

    class Classifier(SAMModule):
        def __init__(self):
            super().__init__(accumulate_grad_batches=2)
            self.net = torch.nn.Linear(10, 3)

        def sam_loss(self, batch):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return samopt.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

    lightning.Trainer(max_epochs=3, precision="bf16-mixed").fit(Classifier(), loader)

With :class:`samopt.DeltaSAM` implement :meth:`SAMModule.sam_per_example_loss` too:
δ-SAM owns its backward passes, so each window's batches are collected and updated on
as one batch (its memory is then that of the whole window). With an ascent on a
sub-batch (:class:`~samopt.sub_batch.SubBatchAscent`) the clean pass gets the first
``1/m`` of each batch (tensors, tuples, lists and dicts of them are cut). With
:class:`samopt.MSAM` (one pass, the weights at ``w~`` between steps) each window is one
plain optimizer step, and validation, testing and checkpoints see the true weights.

Needs ``lightning`` (``pip install 'samopt[lightning]'``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

import samopt
from samopt import validation
from samopt.seams import Pass

try:
    import lightning as L
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("samopt.integrations.lightning needs lightning: pip install 'samopt[lightning]'") from e

__all__ = ["SAMModule"]


class SAMModule(L.LightningModule):
    """A ``LightningModule`` whose ``configure_optimizers`` returns a samopt :class:`~samopt.SAM` (SAM, ASAM,
    Sparse SAM masks); subclasses implement :meth:`sam_loss` instead of ``training_step``."""

    def __init__(self, accumulate_grad_batches: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.sam_accumulate = validation.positive_int("accumulate_grad_batches", accumulate_grad_batches)
        self._window: list[Any] = []
        self._true: contextlib.AbstractContextManager[None] | None = None  # MSAM's true weights, in place

    def sam_loss(self, batch: Any) -> Tensor:
        """The (mean) training loss of ``batch``; called at ``w`` and again at ``w + e``."""
        raise NotImplementedError("SAMModule subclasses implement sam_loss(batch) -> loss")

    def sam_per_example_loss(self, batch: Any) -> tuple[Tensor, Tensor]:
        """For :class:`samopt.DeltaSAM`: the per-example losses of ``batch`` (shape ``(batch,)``, no reduction) and
        the logits they come from (needed by ``estimator="logit"``)."""
        raise NotImplementedError("with DeltaSAM, SAMModule subclasses implement sam_per_example_loss(batch)")

    def _sam(self) -> tuple[Any, samopt.SAM | samopt.MSAM]:
        wrapper = self.optimizers()
        opt = getattr(wrapper, "optimizer", wrapper)
        if not isinstance(opt, samopt.SAM | samopt.MSAM):
            raise TypeError(
                "SAMModule needs configure_optimizers() to return one samopt.SAM (SAM, ASAM, Sparse SAM, DeltaSAM, "
                f"LookSAM) or samopt.MSAM, got {type(opt).__name__}"
            )
        return wrapper, opt

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The clean pass of ``batch``; the update at the end of each window of ``accumulate_grad_batches``.

        With :class:`samopt.DeltaSAM` (which owns its backward passes) the window's batches
        are only collected, then updated on as one batch; the window's mean loss is returned
        at its end, ``None`` before.
        """
        wrapper, opt = self._sam()
        k = self.sam_accumulate
        self._window.append(batch)
        end = len(self._window) == k or self.trainer.is_last_batch
        if isinstance(opt, samopt.MSAM):
            loss = self.sam_loss(batch)
            self.manual_backward(loss / k)
            if end:
                self._window = []
                self._msam_step(wrapper)
            return loss.detach()
        if opt.per_example:
            return self._update(wrapper, opt, k) if end else None
        with opt.first_pass():  # a tensor mask's unperturbed tensors get no gradient here
            loss = self.sam_loss(Pass("clean", opt.ascent.sub_batches).take(batch))
            self.manual_backward(loss / k)
        if end:
            self._update(wrapper, opt, k)
        return loss.detach()

    def _msam_step(self, wrapper: Any) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None
        wrapper.step()  # Lightning's precision plugin: the GradScaler's step and update, or the plain step
        wrapper.zero_grad()
        if scaler is None or scaler.get_scale() >= scale:
            self._step_schedulers("step")

    def _msam(self) -> samopt.MSAM | None:
        if self._trainer is None or not self.trainer.optimizers:
            return None
        opt = self.trainer.optimizers[0]
        return opt if isinstance(opt, samopt.MSAM) else None

    def _enter_true_weights(self) -> None:
        opt = self._msam()
        if opt is not None:
            self._true = opt.true_weights()
            self._true.__enter__()

    def _leave_true_weights(self) -> None:
        true, self._true = self._true, None
        if true is not None:
            true.__exit__(None, None, None)

    def on_validation_start(self) -> None:
        self._enter_true_weights()  # MSAM: validate the true weights, not the perturbed ones

    def on_validation_end(self) -> None:
        self._leave_true_weights()

    def on_test_start(self) -> None:
        self._enter_true_weights()

    def on_test_end(self) -> None:
        self._leave_true_weights()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        opt = self._msam()
        if opt is not None:  # MSAM: the checkpoint holds the true weights
            with opt.true_weights():
                checkpoint["state_dict"] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def _update(self, wrapper: Any, opt: samopt.SAM, k: int) -> Tensor | None:
        window, self._window = self._window, []
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None else None
        wrapper._on_before_step()  # Lightning's step bookkeeping (global_step, progress)
        loss = None
        if opt.per_example:

            def closure() -> tuple[Tensor, list[Tensor]]:
                parts = [self.sam_per_example_loss(batch) for batch in window]
                return torch.cat([p[0] for p in parts]), [p[1] for p in parts]  # logits per batch

            loss = opt.step(closure, scaler=scaler).detach()
        else:
            self._two_passes(opt, window, k, scaler)
        skipped = False
        if scaler is not None:
            scaler.update()
            skipped = scaler.get_scale() < scale
        wrapper._on_after_step()
        if not skipped:
            self._step_schedulers("step")
        return loss

    def _two_passes(self, opt: samopt.SAM, window: list[Any], k: int, scaler: Any) -> None:
        with opt.perturbed(scaler=scaler, zero_grad=True) as ascending:
            if ascending:
                for batch in window:
                    self.manual_backward(self.sam_loss(batch) / k)

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    def _step_schedulers(self, interval: str) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or (interval == "step" and self.trainer.global_step % config.frequency):
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise TypeError(
                    "SAMModule steps the schedulers of configure_optimizers() itself, and a ReduceLROnPlateau needs "
                    "the metric it monitors, which Lightning drops under manual optimisation: return it from "
                    "configure_optimizers() without an lr_scheduler entry and step it yourself with the metric "
                    "(e.g. in on_validation_epoch_end)"
                )
            config.scheduler.step()
