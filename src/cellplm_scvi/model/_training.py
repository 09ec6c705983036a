"""Training plan and callbacks that keep a run safe: non-finite losses stop it, interrupts keep the best weights."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import torch
from scvi.train import TrainingPlan


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
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step} "
                f"(minibatch {batch_idx}); training stopped before this update. Try a lower learning rate "
                "(train(lr=...)), gradient clipping (train(gradient_clip_val=1.0)), or check the input for "
                "extreme or non-count values."
            )
        return output


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
