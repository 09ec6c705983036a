"""Faults during training: non-finite losses, interrupts, checkpoints and resuming."""

import lightning.pytorch as pl
import numpy as np
import pytest
import scvi
import torch
from conftest import TINY_MODEL, make_tissues

from cellplm_scvi import CellPLM
from cellplm_scvi.model import NonFiniteLossError

SMALL = {**TINY_MODEL, "n_latent": 6, "n_components": 4}
TRAIN = {"max_cells_per_batch": 60, "accelerator": "cpu", "enable_progress_bar": False}


class RaiseAt(pl.Callback):
    def __init__(self, epoch, batch, exception):
        self.epoch, self.batch, self.exception = epoch, batch, exception

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise self.exception


@pytest.fixture
def model():
    scvi.settings.seed = 0
    adata = make_tissues(n_cells=180)
    CellPLM.setup_anndata(adata, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial")
    return CellPLM(adata, max_cells_per_context=30, **SMALL)


def test_non_finite_loss_stops_with_epoch_and_step(model):
    with torch.no_grad():
        model.module.log_dispersion.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"became nan at epoch 0, step 0 .*lower learning rate"):
        model.train(max_epochs=3, **TRAIN)
    encoder = [p for name, p in model.module.named_parameters() if name != "log_dispersion"]
    assert all(torch.isfinite(p).all() for p in encoder)  # no update was made from the NaN loss


class Snapshots(pl.Callback):
    """Module weights after each validation epoch."""

    def __init__(self):
        self.states = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.module.state_dict().items()})


def test_keyboard_interrupt_keeps_the_best_weights(model):
    snapshots = Snapshots()
    with pytest.warns(UserWarning, match="Training was interrupted; keeping the weights of epoch"):
        model.train(max_epochs=10, callbacks=[snapshots, RaiseAt(3, 1, KeyboardInterrupt())], **TRAIN)
    elbo = model.history["elbo_validation"]["elbo_validation"].to_numpy()
    assert len(elbo) == 3 and len(snapshots.states) == 3
    assert model.is_trained and not model.module.training
    best = snapshots.states[int(np.argmin(elbo))]
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value, best[name])
    assert np.isfinite(model.get_latent_representation()).all()


def test_killed_mid_epoch_is_usable_and_resumes_from_checkpoint(model, tmp_path):
    with (
        pytest.raises(RuntimeError, match="power cut"),
        pytest.warns(UserWarning, match="Training failed; keeping"),
    ):
        model.train(
            max_epochs=4,
            checkpoint_dir=tmp_path,
            callbacks=[RaiseAt(2, 1, RuntimeError("power cut"))],
            **TRAIN,
        )
    assert np.isfinite(model.get_latent_representation()).all()
    assert (tmp_path / "last.ckpt").exists()
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1  # the last finished epoch (0-based)
    model.train(max_epochs=4, ckpt_path=str(tmp_path / "last.ckpt"), **TRAIN)
    assert model.is_trained
    assert model.trainer.current_epoch == 4
    assert np.isfinite(model.get_latent_representation()).all()


class NaNGradientsAt(pl.Callback):
    """Make every gradient NaN after the backward pass of the first step of ``epoch``."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_after_backward(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            for parameter in pl_module.module.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))


def test_nan_gradients_stop_training_with_the_documented_error(model, capsys):
    snapshots = Snapshots()
    with (
        pytest.raises(
            NonFiniteLossError, match=r"gradient norm became nan at epoch 1, .*lower learning rate"
        ),
        pytest.warns(UserWarning, match="Training failed; keeping the weights of epoch 0"),
    ):
        model.train(max_epochs=3, callbacks=[snapshots, NaNGradientsAt(1)], **TRAIN)
    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value, snapshots.states[0][name])
    assert "Exception raised during training" not in capsys.readouterr().out


def test_a_diverging_learning_rate_stops_with_the_documented_error(model, capsys):
    with pytest.raises(
        NonFiniteLossError, match=r"became (nan|inf|-inf) at epoch \d+, step \d+ .*lower learning rate"
    ):
        model.train(max_epochs=20, lr=1e6, **TRAIN)
    assert all(torch.isfinite(p).all() for p in model.module.parameters())  # no update from a NaN
    assert "Exception raised during training" not in capsys.readouterr().out
