"""Training plan, runner and callbacks that keep a run safe: non-finite values stop it, interrupts keep the best weights."""

from __future__ import annotations

import contextlib
import copy
import math
import sys

import lightning.pytorch as pl
import torch
from scvi.train import TrainingPlan, TrainRunner


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class CellPLMTrainingPlan(TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan`, in training mode from the start, stopping before any update from a NaN or infinite loss."""

    def on_fit_start(self) -> None:
        """Put the module in training mode.

        scvi-tools leaves it in evaluation mode after training, loading and inference, and
        Lightning trains in whatever mode it finds: a second ``train()`` (or fine-tuning loaded
        weights) would otherwise run without masking and dropout.
        """
        super().on_fit_start()
        self.train()

    def training_step(self, batch, batch_idx):
        """One step; raises :class:`NonFiniteLossError` (no weight update) when the loss is not finite."""
        output = super().training_step(batch, batch_idx)
        loss = output["loss"] if isinstance(output, dict) else output
        if not torch.isfinite(loss).all():
            self._stop(f"The training loss became {loss.item()}", f"minibatch {batch_idx}")
        return output

    def on_before_optimizer_step(self, optimizer) -> None:
        """Raise :class:`NonFiniteLossError` before an update from a NaN or infinite gradient."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if not torch.isfinite(norm):
                self._stop(f"The gradient norm became {norm.item()}", "after the backward pass")

    def _stop(self, what: str, where: str):
        raise NonFiniteLossError(
            f"{what} at epoch {self.current_epoch}, step {self.global_step} ({where}); training "
            "stopped before this update. Try a lower learning rate (train(lr=...)), gradient clipping "
            "(train(gradient_clip_val=1.0)), or check the input for extreme or non-count values."
        )


class KeepBestWeights(pl.Callback):
    """Remember the module weights of the best validation ELBO (or the last epoch, without validation).

    :meth:`restore` puts them back; :class:`~cellplm_scvi.CellPLM` calls it when training is
    interrupted.

    Parameters
    ----------
    monitor
        Logged metric to minimise.
    """

    def __init__(self, monitor: str = "elbo_validation"):
        self.monitor = monitor
        self.best_score = math.inf
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _remember(self, trainer: pl.Trainer, pl_module: pl.LightningModule, score: float) -> None:
        self.best_score, self.best_epoch = score, trainer.current_epoch
        self.best_state = copy.deepcopy(
            {k: v.detach().cpu() for k, v in pl_module.module.state_dict().items()}
        )

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the weights when the validation ELBO improved."""
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and not trainer.sanity_checking and float(score) < self.best_score:
            self._remember(trainer, pl_module, float(score))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Without validation, keep the weights of every finished epoch."""
        if self.monitor not in trainer.callback_metrics:
            self._remember(trainer, pl_module, math.inf)

    def restore(self, module: torch.nn.Module) -> bool:
        """Load the remembered weights into ``module``; ``False`` when none were remembered."""
        if self.best_state is None:
            return False
        module.load_state_dict(self.best_state)
        return True


class CellPLMTrainRunner(TrainRunner):
    """scvi-tools' :class:`~scvi.train.TrainRunner`, without the line it prints to stdout when a run fails.

    That line (``Exception raised during training. <class 'NameError'> ...``) repeats the
    exception, which is raised unchanged; everything else written to stdout passes through.
    """

    def _run_training_core(self):
        with contextlib.redirect_stdout(_WithoutPrint(sys.stdout, "Exception raised during training.")):
            super()._run_training_core()


class _WithoutPrint:
    """A text stream that forwards everything to ``stream`` except a ``print`` call whose first item is ``first``."""

    def __init__(self, stream, first: str):
        self._stream, self._first, self._dropping = stream, first, False

    def write(self, text: str) -> int:
        if text == self._first:
            self._dropping = True
        if not self._dropping:
            return self._stream.write(text)
        self._dropping = text != "\n"  # print writes its items, separators and end one by one
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
