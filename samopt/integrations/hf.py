"""A Hugging Face ``Trainer`` that runs samopt's SAM-family optimizers correctly.

The ``Trainer`` calls ``optimizer.step()`` without a closure, after it has already
accumulated the gradients of the clean pass over ``gradient_accumulation_steps``
micro-batches, clipped them, and (with fp16) wrapped the step in its
``GradScaler``. None of that fits SAM, which needs the gradient at ``w`` to perturb
and then a second pass at ``w + e``. :class:`SAMTrainer` keeps the ``Trainer``'s own
machinery and changes three things:

- each micro-batch of the accumulation window is remembered as it is trained on;
- the optimizer step becomes: :meth:`samopt.SAM.first_step` on the accumulated clean
  gradient, the same micro-batches again at ``w + e`` (same loss and scaling as the
  ``Trainer``'s ``training_step``), :meth:`samopt.SAM.second_step`, then the fp16
  scaler's ``update()`` (an overflow in either pass skips the update and the LR step);
- ``max_grad_norm`` clips the gradient taken at ``w + e`` (the one the update uses),
  inside the engine, instead of the clean gradient, which SAM normalises anyway.

The loss at ``w + e`` is scaled over the accumulation window exactly as the ``Trainer``
scales the clean one. Note that the ``Trainer`` does not divide by
``gradient_accumulation_steps`` for a model whose ``forward`` takes ``**kwargs``, expecting
it to normalise by ``num_items_in_batch``; heads that ignore it (BERT's sequence
classification among them, transformers#47688) then train on the *sum* of the
micro-batches' mean losses, with or without samopt. ``trainer.model_accepts_loss_kwargs =
False`` restores the mean. SAM's perturbation does not depend on that scale; the update
(with SGD), and what ``max_grad_norm`` clips, do.

Checkpoints go through the ``Trainer``'s own ``save``/``resume_from_checkpoint``:
``SAM.state_dict()`` holds the base optimizer's state, masks and their RNG.

Example::

    opt = samopt.SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=2e-5, weight_decay=0.01)
    trainer = SAMTrainer(model=model, args=TrainingArguments(...), train_dataset=ds, optimizers=(opt, None))
    trainer.train()

δ-SAM (:class:`samopt.DeltaSAM`) owns its backward passes: its update runs at the last
micro-batch of each window, over the whole window as one batch, with per-example
losses from :meth:`SAMTrainer.per_example_loss` (cross-entropy on ``logits`` by
default). The window's graphs are then held together, so its memory is that of the
whole effective batch, not of one micro-batch.

Needs ``transformers`` >= 5.8 and ``accelerate`` (``pip install 'samopt[hf]'``).
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

import samopt
from samopt.seams import Pass

try:
    import transformers
    from packaging.version import Version
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("samopt.integrations.hf needs transformers and accelerate: pip install 'samopt[hf]'") from e
if Version(transformers.__version__) < Version("5.8"):  # pragma: no cover - older Trainers are refused
    # 5.3-5.7 have the hooks SAMTrainer overrides, but they let accelerate divide a window's losses by its length on
    # top of their own rule, and a resumed run differs from an uninterrupted one; 5.8 is the oldest release tested.
    raise ImportError(
        f"samopt.integrations.hf needs transformers >= 5.8 (found {transformers.__version__}): pip install 'samopt[hf]'"
    )

__all__ = ["SAMTrainer"]


class SAMTrainer(Trainer):
    """``transformers.Trainer`` for a samopt :class:`~samopt.SAM` (SAM, ASAM, Sparse SAM masks, LookSAM, the
    schedules, an ascent on a sub-batch), :class:`~samopt.DeltaSAM` or :class:`~samopt.MSAM` given as
    ``optimizers=(opt, scheduler_or_None)``. Every other ``Trainer`` feature works as usual; with MSAM, whose
    weights rest at the perturbed point between steps, evaluation, prediction and saving see the true weights."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._window: list[tuple[nn.Module, dict[str, Any], Any, int]] = []

    def _opt(self) -> samopt.SAM | samopt.MSAM:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if not isinstance(opt, samopt.SAM | samopt.MSAM):
            raise TypeError(
                f"SAMTrainer needs a samopt.SAM optimizer (SAM, ASAM, Sparse SAM, DeltaSAM, LookSAM) or samopt.MSAM "
                f"in optimizers=(opt, scheduler), got {type(opt).__name__}; for other optimizers use "
                "transformers.Trainer"
            )
        return opt

    def _sam(self) -> samopt.SAM:
        opt = self._opt()
        assert isinstance(opt, samopt.SAM)
        return opt

    def _msam(self) -> samopt.MSAM | None:
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        return opt if isinstance(opt, samopt.MSAM) else None

    def _true_weights(self) -> contextlib.AbstractContextManager[None]:
        msam = self._msam()
        return msam.true_weights() if msam is not None else contextlib.nullcontext()

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """``Trainer.evaluate``, on MSAM's true weights."""
        with self._true_weights():
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.predict``, on MSAM's true weights."""
        with self._true_weights():
            return super().predict(*args, **kwargs)

    def save_model(self, *args: Any, **kwargs: Any) -> None:
        """``Trainer.save_model`` (checkpoints included), of MSAM's true weights."""
        with self._true_weights():
            super().save_model(*args, **kwargs)

    def _take_over_step(self, opt: samopt.SAM) -> None:
        wrapper: Any = self.optimizer  # accelerate's wrapper, whose step the Trainer calls
        if getattr(wrapper, "_samopt_step", False):
            return
        clip = self.args.max_grad_norm
        if clip and clip > 0:
            if opt.max_grad_norm not in (None, clip):
                raise ValueError(
                    f"max_grad_norm is set twice: {opt.max_grad_norm} on the optimizer and {clip} in "
                    "TrainingArguments; set one (SAMTrainer applies it to the gradient at w + e)"
                )
            opt.max_grad_norm = clip

        def step(closure: Any = None) -> None:  # the Trainer calls optimizer.step() once per accumulation window
            self._sam_step()
            wrapper._opt_called = True  # what an LR scheduler's own step() wrapper would record

        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # ... so the scheduler does not warn
        wrapper.step = step
        wrapper._samopt_step = True

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """The ``Trainer``'s clean pass at ``w``; the micro-batch is kept for the pass at ``w + e``.

        With :class:`samopt.DeltaSAM`, which owns its backward passes, the micro-batches
        are only collected, and the whole δ-SAM update runs at the window's last one;
        that one returns the window's mean loss and the others 0, so the loss the
        ``Trainer`` logs (their sum) is the window's mean loss, as usual.
        """
        opt = self._opt()
        if isinstance(opt, samopt.MSAM):  # one pass: the Trainer's own step, clipping and scaler
            return super().training_step(model, inputs, num_items_in_batch)
        self._take_over_step(opt)
        if opt.per_example:
            model.train()
            self._window.append((model, self._prepare_inputs(inputs), num_items_in_batch, 0))
            if len(self._window) < self.current_gradient_accumulation_steps:
                return torch.zeros((), device=self.args.device)
            return self._delta_step(opt)
        self._window.append((model, inputs, num_items_in_batch, self.current_gradient_accumulation_steps))
        clean = Pass("clean", opt.ascent.sub_batches).take(inputs)  # all of it, or 1/m with SubBatchAscent(m)
        with opt.first_pass():  # a tensor mask's unperturbed tensors get no gradient here
            return super().training_step(model, clean, num_items_in_batch)

    def per_example_loss(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-example losses and the logits of a micro-batch, for :class:`samopt.DeltaSAM`.

        Cross-entropy of the model's ``logits`` against ``labels`` (mean squared error
        for a single float output, as for regression); override for other losses.
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        with self.compute_loss_context_manager():
            logits = model(**inputs).logits
        if logits.shape[-1] == 1 and labels.is_floating_point():
            return F.mse_loss(logits[:, 0].float(), labels.float(), reduction="none"), logits
        return F.cross_entropy(logits.float(), labels, reduction="none"), logits

    def _delta_step(self, opt: samopt.SAM) -> torch.Tensor:
        window, self._window = self._window, []

        def closure() -> tuple[torch.Tensor, list[torch.Tensor]]:  # the whole window is one δ-SAM batch
            parts = [self.per_example_loss(model, inputs) for model, inputs, _, _ in window]
            return torch.cat([p[0] for p in parts]), [p[1] for p in parts]  # logits per micro-batch

        scaler = self._scaler()
        scale = scaler.get_scale() if scaler is not None else None
        loss = opt.step(closure, scaler=scaler)
        self._after_update(scaler, scale)
        return loss.detach()

    def _scaler(self) -> torch.amp.GradScaler | None:
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _after_update(self, scaler: torch.amp.GradScaler | None, scale: float | None) -> None:
        if scaler is not None:
            scaler.update()
            overflowed = scale is not None and scaler.get_scale() < scale
            cast(Any, self.optimizer)._is_overflow = overflowed  # the Trainer then skips the LR step

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        if self._msam() is not None:
            return super()._clip_grad_norm(model)
        return None  # the engine clips the gradient at w + e

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if self._msam() is not None:
            return super()._get_grad_norm(model, grad_norm)
        return None  # the clean gradient's norm would unscale fp16 gradients behind the engine's back

    def _perturbed_loss(self, model: nn.Module, inputs: dict[str, Any], num_items: Any, steps: int) -> torch.Tensor:
        """The loss ``training_step`` backpropagates, recomputed (at ``w + e``)."""
        with self.compute_loss_context_manager():
            loss = cast(
                torch.Tensor, self.compute_loss(model, self._prepare_inputs(inputs), num_items_in_batch=num_items)
            )
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # a Trainer attribute since transformers 5.20
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items is not None) or self.compute_loss_func is not None
        return loss if scaled else loss / steps

    def _sam_step(self) -> None:
        opt = self._sam()
        if opt.per_example:
            return  # the update ran in the window's last training_step
        window, self._window = self._window, []
        scaler = self._scaler()
        scale = scaler.get_scale() if scaler is not None else None
        with opt.perturbed(scaler=scaler) as ascending:
            if ascending:
                for model, inputs, num_items, steps in window:
                    self.accelerator.backward(self._perturbed_loss(model, inputs, num_items, steps))
        self._after_update(scaler, scale)
