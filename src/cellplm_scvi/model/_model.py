"""The CellPLM model: scvi-tools glue over :class:`~cellplm_scvi.module.CellPLMModule`."""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import anndata
import mudata
import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import ModelCheckpoint
from mudata import MuData
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager, fields
from scvi.data._download import _download
from scvi.model._utils import _get_batch_code_from_category, parse_device_args
from scvi.model.base import BaseModelClass, RNASeqMixin, UnsupervisedTrainingMixin, VAEMixin
from scvi.model.base._constants import SAVE_KEYS
from scvi.model.base._save_load import _initialize_model
from scvi.model.base._training_mixin import get_max_epochs_heuristic
from scvi.utils import setup_anndata_dsp, track

from cellplm_scvi._constants import BATCH_KEYS, CELLPLM_REGISTRY_KEYS
from cellplm_scvi.data import (
    DEFAULT_MAX_CELLS_PER_BATCH,
    DEFAULT_MAX_CELLS_PER_CONTEXT,
    TissueDataLoader,
    TissueDataSplitter,
    tissue_data,
)
from cellplm_scvi.module import CellPLMModule, library_sizes
from cellplm_scvi.pretrained import align_genes, load_released_weights, module_kwargs, read_checkpoint

from ._fields import CoordinatesField, MuDataCoordinatesField
from ._files import read_model_file
from ._presets import resolve_preset
from ._training import CellPLMTrainingPlan, CellPLMTrainRunner, KeepBestWeights
from ._validation import (
    check_anndata,
    check_anndata_not_empty,
    check_counts,
    check_genes,
    check_layer,
    check_obs_key,
    check_spatial,
)

logger = logging.getLogger(__name__)


def inference_cells_per_batch(n_hidden: int) -> int:
    """Default cell budget of an inference pass: ``2**19 / D`` cells, at least 1,024; a larger unit (tissue or tile) goes alone.

    Each pass pays a fixed cost per layer, so narrow models pack more cells per pass while an
    ``(N, D)`` activation stays within 2 MiB (float32) up to ``D`` = 512; wide models keep the
    smaller passes and their smaller memory. Chosen by ``benchmarks/inference_budget.py``.
    """
    return max(1024, (1 << 19) // n_hidden)


class CellPLM(RNASeqMixin, VAEMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """CellPLM: a cell language model over tissues (Wen et al., ICLR 2024) on scvi-tools.

    Cells are tokens and a tissue (one batch × field-of-view) is a sentence: every cell attends to
    the other cells of its tissue, never to other tissues. Tissues larger than
    ``max_cells_per_context`` are cut into spatial tiles (or fixed chunks without coordinates).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (or MuData with :meth:`setup_mudata`).
    registry
        Registry of a saved model; lets a model be built without data (used by :meth:`load`).
    preset
        ``None`` (a small model that trains on a laptop CPU) or ``"cellplm-85m"`` (the released
        architecture). Keyword arguments override the preset.
    max_cells_per_context
        Context limit: the largest set of cells that attend to each other.
    **module_kwargs
        Passed to :class:`~cellplm_scvi.module.CellPLMModule` (``n_hidden``, ``n_layers``,
        ``n_heads``, ``n_latent``, ``n_components``, ``latent``, ``attention``,
        ``dropout``, masking rates, ``use_positional_encoding``, ...).

    Examples
    --------
    >>> CellPLM.setup_anndata(adata, layer="counts", batch_key="sample", fov_key="fov", spatial_key="spatial")
    >>> model = CellPLM(adata)
    >>> model.train(max_epochs=50)
    >>> adata.obsm["X_cellplm"] = model.get_latent_representation()
    """

    _module_cls = CellPLMModule
    _training_plan_cls = CellPLMTrainingPlan
    _train_runner_cls = CellPLMTrainRunner
    _data_splitter_cls = TissueDataSplitter
    _data_loader_cls = TissueDataLoader

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        preset: str | None = None,
        max_cells_per_context: int = DEFAULT_MAX_CELLS_PER_CONTEXT,
        **module_kwargs,
    ):
        super().__init__(adata, registry)
        if "max_cells_per_tissue" in module_kwargs:
            warnings.warn(
                "max_cells_per_tissue is now called max_cells_per_context (a tissue larger than it is cut "
                "into several contexts); the old name goes in 0.3.",
                FutureWarning,
                stacklevel=settings.warnings_stacklevel,
            )
            max_cells_per_context = module_kwargs.pop("max_cells_per_tissue")
        if int(max_cells_per_context) < 1:
            raise ValueError(
                f"max_cells_per_context must be a positive number of cells, got {max_cells_per_context}."
            )
        self.max_cells_per_context = int(max_cells_per_context)
        # saved with the model, so that a later change of the default does not change a saved model
        module_kwargs.setdefault("batch_in_decoder", "every_block")
        kwargs = resolve_preset(preset, module_kwargs)
        self.module = self._module_cls(
            n_input=self.summary_stats.n_vars, n_batch=self.summary_stats.n_batch, **kwargs
        )
        m = self.module
        self._model_summary_string = (
            f"CellPLM model ({preset or 'default'}): latent={m.latent_kind}, "
            f"attention={type(m.encoder.layers[0].attention).__name__}, "
            f"n_hidden={m.n_hidden}, n_layers={len(m.encoder.layers)}, n_latent={m.n_latent}, "
            f"positional encoding={'on' if m.use_positional_encoding else 'off'}, "
            f"max_cells_per_context={self.max_cells_per_context}, "
            f"{sum(p.numel() for p in m.parameters()):,} parameters"
        )
        self.init_params_ = self._get_init_params(locals())

    # ------------------------------------------------------------- registration
    @classmethod
    @setup_anndata_dsp.dedent
    def setup_anndata(
        cls,
        adata: AnnData,
        layer: str | None = None,
        batch_key: str | None = None,
        fov_key: str | None = None,
        spatial_key: str | None = None,
        labels_key: str | None = None,
        **kwargs,
    ) -> None:
        """%(summary)s.

        A tissue is one value of (``batch_key``, ``fov_key``); without either, all cells form one
        tissue. Coordinates are normalised per tissue inside the data pipeline; ``adata`` is
        not changed beyond the registry's ``_scvi_*`` columns and ``uns`` entries.

        Parameters
        ----------
        %(param_adata)s
        %(param_layer)s
            Must hold raw counts.
        %(param_batch_key)s
            The sample / slide; the decoder learns one embedding per batch.
        fov_key
            Key in ``adata.obs`` for the field of view inside a batch (optional).
        spatial_key
            Key in ``adata.obsm`` with ``(n_obs, 2)`` x/y coordinates (optional). Without it the
            cells get a learned placeholder instead of a positional encoding.
        %(param_labels_key)s
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        check_anndata(adata)
        check_layer(adata, layer)
        for key, argument in ((batch_key, "batch_key"), (fov_key, "fov_key"), (labels_key, "labels_key")):
            check_obs_key(adata, key, argument)
        check_spatial(adata, spatial_key)
        counts = adata.X if layer is None else adata.layers[layer]
        _warn_if_not_counts(counts, "adata.X" if layer is None else f"adata.layers[{layer!r}]")
        anndata_fields = [
            fields.LayerField(REGISTRY_KEYS.X_KEY, layer, is_count_data=True),
            fields.CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            fields.CategoricalObsField(CELLPLM_REGISTRY_KEYS.FOV_KEY, fov_key),
            fields.CategoricalObsField(REGISTRY_KEYS.LABELS_KEY, labels_key),
        ]
        if spatial_key is not None:
            anndata_fields.append(CoordinatesField(CELLPLM_REGISTRY_KEYS.SPATIAL_KEY, spatial_key))
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        rna_layer: str | None = None,
        batch_key: str | None = None,
        fov_key: str | None = None,
        spatial_key: str | None = None,
        labels_key: str | None = None,
        modalities: dict[str, str] | None = None,
        **kwargs,
    ) -> None:
        """Register a :class:`~mudata.MuData` for CellPLM.

        Parameters
        ----------
        mdata
            The MuData.
        rna_layer
            Layer of the RNA modality with raw counts (``None``: its ``X``).
        batch_key, fov_key, labels_key
            ``obs`` keys, as in :meth:`setup_anndata`.
        spatial_key
            ``obsm`` key with coordinates, as in :meth:`setup_anndata`.
        modalities
            Which modality holds each item, e.g. ``{"rna_layer": "rna", "batch_key": "rna",
            "spatial_key": "rna"}``; ``rna_layer`` is required.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if not modalities or "rna_layer" not in modalities:
            raise ValueError("setup_mudata needs modalities={'rna_layer': <name of the RNA modality>, ...}.")
        if modalities["rna_layer"] not in mdata.mod:
            raise KeyError(
                f"Modality {modalities['rna_layer']!r} is not in mdata.mod; available: {list(mdata.mod)}."
            )
        check_anndata(mdata.mod[modalities["rna_layer"]])
        modalities = cls._create_modalities_attr_dict(modalities, setup_method_args)
        mudata_fields = [
            fields.MuDataLayerField(
                REGISTRY_KEYS.X_KEY,
                rna_layer,
                mod_key=modalities.rna_layer,
                is_count_data=True,
                mod_required=True,
            ),
            fields.MuDataCategoricalObsField(
                REGISTRY_KEYS.BATCH_KEY, batch_key, mod_key=modalities.batch_key
            ),
            fields.MuDataCategoricalObsField(
                CELLPLM_REGISTRY_KEYS.FOV_KEY, fov_key, mod_key=modalities.fov_key
            ),
            fields.MuDataCategoricalObsField(
                REGISTRY_KEYS.LABELS_KEY, labels_key, mod_key=modalities.labels_key
            ),
        ]
        if spatial_key is not None:
            mudata_fields.append(
                MuDataCoordinatesField(
                    CELLPLM_REGISTRY_KEYS.SPATIAL_KEY, spatial_key, mod_key=modalities.spatial_key
                )
            )
        adata_manager = AnnDataManager(fields=mudata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(mdata, **kwargs)
        cls.register_manager(adata_manager)

    @classmethod
    def from_cellplm_checkpoint(
        cls,
        adata: AnnData,
        checkpoint: str | Path | tuple[str | Path, str | Path],
        layer: str | None = None,
        batch_key: str | None = None,
        fov_key: str | None = None,
        spatial_key: str | None = None,
        labels_key: str | None = None,
        gene_id_key: str | None = None,
        pretrained_batch_ids: dict[str, int] | None = None,
        pretrained_dataset_id: int | None = None,
        use_positional_encoding: bool = False,
        strict: bool = True,
        max_cells_per_context: int = DEFAULT_MAX_CELLS_PER_CONTEXT,
        **deprecated,
    ) -> CellPLM:
        """A model holding the weights of a published CellPLM checkpoint (``20230926_85M`` or ``20231027_85M``).

        The layout (Gaussian-mixture or plain Gaussian latent) is read from the weights. Genes are
        matched to the checkpoint's gene list by Ensembl ID; genes outside it are left out with a
        warning, and the model is bound to ``adata`` restricted to the matched genes (a copy, in
        ``model.adata``; its cells are in the order of ``adata``). The model is ready for zero-shot
        :meth:`get_latent_representation` and can be fine-tuned with :meth:`train`.

        The published weights were trained with the positional encoding switched off (the original
        code adds zero instead of it), so it is off here by default; switch it on only to
        fine-tune with coordinates.

        Batches: the checkpoint's decoder has one embedding row per pre-training batch. Each batch
        of ``adata`` gets its own row, initialised from ``pretrained_batch_ids[category]`` when
        given and otherwise from the mean of all pre-trained rows (the original code adds the
        *sum* of all rows when it has no batch id). The dataset covariate likewise uses row
        ``pretrained_dataset_id`` or the mean row.

        Parameters
        ----------
        adata
            Raw counts with human Ensembl gene IDs.
        checkpoint
            Prefix (``.../20231027_85M``) of ``{prefix}.config.json`` and ``{prefix}.best.ckpt``,
            or the two paths.
        layer, batch_key, fov_key, spatial_key, labels_key
            As in :meth:`setup_anndata`.
        gene_id_key
            ``adata.var`` column with Ensembl IDs (default: ``var_names``).
        pretrained_batch_ids
            Batch category → row of the released batch table.
        pretrained_dataset_id
            Row of the released dataset table.
        use_positional_encoding
            Add the spatial encoding (default off, as in pre-training).
        strict
            Raise when any checkpoint tensor is missing or unexpected (otherwise warn).
        max_cells_per_context
            Context limit (the release used 4,000).
        **deprecated
            ``max_cells_per_tissue``, the old name of ``max_cells_per_context``.

        Returns
        -------
        The model; ``model.checkpoint_report_`` lists what was loaded.
        """
        released = read_checkpoint(checkpoint)
        kept, rows = align_genes(adata, released.gene_list, gene_id_key)
        data = adata[:, kept].copy()
        cls.setup_anndata(
            data,
            layer=layer,
            batch_key=batch_key,
            fov_key=fov_key,
            spatial_key=spatial_key,
            labels_key=labels_key,
        )
        model = cls(
            data,
            max_cells_per_context=max_cells_per_context,
            **deprecated,
            **module_kwargs(released, rows, use_positional_encoding),
        )
        categories = model.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY).categorical_mapping
        n_released = released.config.get("batch_num", 0)
        ids = pretrained_batch_ids or {}
        unknown = set(ids) - set(map(str, categories))
        if unknown:
            raise KeyError(f"pretrained_batch_ids names batches that are not in adata: {sorted(unknown)}.")
        if any(not 0 <= int(v) < n_released for v in ids.values()):
            raise ValueError(
                f"pretrained_batch_ids must be rows of the released batch table, in [0, {n_released})."
            )
        batch_rows = [ids.get(str(c)) for c in categories]
        report = load_released_weights(model.module, released, batch_rows, pretrained_dataset_id)
        if report.missing or report.unexpected:
            if strict:
                raise ValueError(f"The checkpoint does not match the released architecture: {report}")
            warnings.warn(
                f"Partial checkpoint load: {report}", UserWarning, stacklevel=settings.warnings_stacklevel
            )
        logger.info(f"Loaded CellPLM checkpoint ({released.layout} latent): {report}")
        model.checkpoint_report_ = str(report)
        model.is_trained_ = True
        return model

    # ------------------------------------------------------------ saved models
    @classmethod
    def load(
        cls,
        dir_path: str | Path,
        adata: AnnData | MuData | None | Literal[False] = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        backup_url: str | None = None,
        allowed_classes_names_list: list[str] | None = None,
    ) -> CellPLM:
        """A model saved with :meth:`save`, read without running code from the file.

        ``model.pt`` is read by :func:`~cellplm_scvi.model.read_model_file`, which refuses any
        pickle that would call something a saved model never holds (scvi-tools' own loader would
        run it). The genes of ``adata`` must be the model's genes in the model's order.

        Parameters
        ----------
        dir_path
            Folder written by :meth:`save`.
        adata
            Data set up like the training data (it is registered from the saved setup). ``None``:
            the AnnData saved in the folder, if any; ``False``: no data.
        accelerator, device
            Where to put the model, as in scvi-tools.
        prefix
            Prefix of the saved file names.
        backup_url
            URL to download ``model.pt`` from when it is not in ``dir_path``.
        allowed_classes_names_list
            Other model class names whose saved folders are accepted.

        Raises
        ------
        ModelFileError
            When ``model.pt`` is missing, damaged or not a model, or would need unsafe unpickling.
        ValueError
            When the genes of ``adata`` are not the model's, or ``adata`` does not match the setup.
        """
        _, _, device = parse_device_args(
            accelerator=accelerator, devices=device, return_device="torch", validate_single_device=True
        )
        model_file = f"{prefix or ''}{SAVE_KEYS.MODEL_FNAME}"
        if backup_url is not None:
            _download(backup_url, str(dir_path), model_file)
        saved = read_model_file(Path(dir_path) / model_file, map_location=device)
        attr_dict = saved["attr_dict"]
        registry = attr_dict.pop("registry_")
        _with_defaults_of_its_version(attr_dict["init_params_"])
        name = registry.get("model_name", cls.__name__)
        if name != cls.__name__ and name not in (allowed_classes_names_list or []):
            raise ValueError(f"{dir_path} holds a {name} model, not a {cls.__name__}.")
        if adata is None:
            adata = _read_saved_data(Path(dir_path), prefix, registry)
        if adata is not False:
            check_anndata_not_empty(adata)
            check_genes(
                _genes_of(adata, registry),
                saved["var_names"],
                f"CellPLM.load_registry({str(dir_path)!r}){_GENES}",
            )
            getattr(cls, registry.get("setup_method_name", "setup_anndata"))(
                adata, source_registry=registry, **registry["setup_args"]
            )
        model = _initialize_model(cls, adata, registry, attr_dict, None)
        state = saved["model_state_dict"]
        state.pop("pyro_param_store", None)  # written by scvi-tools' save for every model
        model.module.on_load(model)
        model.module.load_state_dict(state)
        model.to_device(device)
        model.module.eval()
        if adata is not False:
            model._validate_anndata(adata)
        return model

    @staticmethod
    def load_registry(dir_path: str | Path, prefix: str | None = None) -> dict:
        """The registry (setup arguments and field states) of a saved model, read safely.

        Raises
        ------
        ModelFileError
            As :meth:`load`.
        """
        model_file = Path(dir_path) / f"{prefix or ''}{SAVE_KEYS.MODEL_FNAME}"
        return read_model_file(model_file, map_location="cpu")["attr_dict"]["registry_"]

    def _validate_anndata(self, adata: AnnData | MuData | None = None, copy_if_view: bool = True):
        """scvi-tools' check and registration of ``adata``, after refusing empty data and genes other than the model's."""
        if adata is not None:
            check_anndata_not_empty(adata)
            check_genes(
                _genes_of(adata, self.registry_),
                _registered_genes(self.registry_),
                f"model.registry_{_GENES}",
            )
        return super()._validate_anndata(adata, copy_if_view)

    # ----------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        lr: float = 1e-3,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        max_cells_per_batch: int = DEFAULT_MAX_CELLS_PER_BATCH,
        drop_cell_rate: float = 0.3,
        early_stopping: bool = False,
        n_epochs_kl_warmup: int | None = None,
        checkpoint_dir: str | None = None,
        plan_kwargs: dict | None = None,
        datasplitter_kwargs: dict | None = None,
        **trainer_kwargs,
    ):
        """Train with scvi-tools' :class:`~scvi.train.TrainingPlan` and Lightning.

        A NaN or infinite loss stops training with :class:`~cellplm_scvi.model.NonFiniteLossError`
        before it corrupts the weights. ``Ctrl+C`` (``KeyboardInterrupt``) stops it and keeps the
        weights of the best validation ELBO so far (the last finished epoch without validation).
        With ``checkpoint_dir``, a Lightning checkpoint is written after every epoch
        (``last.ckpt`` is the newest); pass ``ckpt_path=".../last.ckpt"`` to resume from it.

        Parameters
        ----------
        max_epochs
            Number of passes over the training tissues; default scales with the data size as in
            scVI (``min(400, 20000 / n_cells * 400)``).
        lr
            Learning rate (AdamW).
        accelerator, devices
            Lightning's accelerator and devices (``"cpu"``, ``"gpu"``, ``"auto"``; ``1``, ``[0, 1]``...).
        train_size, validation_size
            Shares of cells, split by whole tissues (default 0.9 / 0.1).
        max_cells_per_batch
            Cell budget of a minibatch: whole tissues are packed up to this many cells. Must be at
            least ``max_cells_per_context``.
        drop_cell_rate
            Share of each tissue's cells left out of each training step (context dropout).
        early_stopping
            Stop when the validation ELBO stops improving.
        n_epochs_kl_warmup
            Epochs over which the KL weight grows from 0 to 1 (default: a quarter of
            ``max_epochs``).
        checkpoint_dir
            Folder for Lightning checkpoints (optimizer state included) to resume from.
        plan_kwargs
            More :class:`~scvi.train.TrainingPlan` arguments.
        datasplitter_kwargs
            More :class:`~cellplm_scvi.data.TissueDataSplitter` arguments (``num_workers``...).
        **trainer_kwargs
            Lightning :class:`~lightning.pytorch.Trainer` arguments.
        """
        if int(max_cells_per_batch) < self.max_cells_per_context:
            raise ValueError(
                f"max_cells_per_batch={max_cells_per_batch} is smaller than max_cells_per_context="
                f"{self.max_cells_per_context}: a whole tissue unit must fit one minibatch. Raise "
                "max_cells_per_batch, or build the model with a smaller max_cells_per_context."
            )
        if max_epochs is None:
            max_epochs = get_max_epochs_heuristic(self.adata.n_obs)
        if int(max_epochs) < 1:
            raise ValueError(f"max_epochs must be a positive integer, got {max_epochs}.")
        plan_kwargs = {
            "lr": lr,
            "optimizer": "AdamW",
            "n_epochs_kl_warmup": max(1, max_epochs // 4)
            if n_epochs_kl_warmup is None
            else n_epochs_kl_warmup,
            **(plan_kwargs or {}),
        }
        datasplitter_kwargs = {
            "max_cells_per_batch": max_cells_per_batch,
            "max_cells_per_context": self.max_cells_per_context,
            "drop_cell_rate": drop_cell_rate,
            **(datasplitter_kwargs or {}),
        }
        trainer_kwargs.setdefault("reload_dataloaders_every_n_epochs", 1)  # the packing changes each epoch
        trainer_kwargs.setdefault("log_every_n_steps", 1)
        if validation_size != 0 and train_size != 1.0:
            trainer_kwargs.setdefault("check_val_every_n_epoch", 1)
        keep_best = KeepBestWeights()
        trainer_kwargs["callbacks"] = [*trainer_kwargs.get("callbacks", []), keep_best]
        if checkpoint_dir is not None:
            trainer_kwargs["callbacks"].append(
                ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}", save_last=True, every_n_epochs=1)
            )
            trainer_kwargs["enable_checkpointing"] = True
        handler = signal.getsignal(signal.SIGINT)
        quiet = warnings.catch_warnings()
        quiet.__enter__()
        # Lightning cannot tell the cell count of a token set; scvi's plan logs metrics with the right one.
        warnings.filterwarnings("ignore", message="Trying to infer the `batch_size`")
        try:
            return super().train(
                max_epochs=max_epochs,
                accelerator=accelerator,
                devices=devices,
                train_size=train_size,
                validation_size=validation_size,
                early_stopping=early_stopping,
                plan_kwargs=plan_kwargs,
                datasplitter_kwargs=datasplitter_kwargs,
                **trainer_kwargs,
            )
        except (
            KeyboardInterrupt,
            SystemExit,
        ):  # Lightning turns Ctrl+C into SystemExit(1) after shutting down
            signal.signal(signal.SIGINT, handler)
            self._keep_best_after_stop(keep_best, "Training was interrupted")
        except Exception:
            self._keep_best_after_stop(keep_best, "Training failed")
            raise
        finally:
            quiet.__exit__(None, None, None)
            self.module.eval()

    def _keep_best_after_stop(self, keep_best: KeepBestWeights, what: str) -> None:
        """After a stopped run, keep the best weights reached so far, so that the model stays usable."""
        restored = keep_best.restore(self.module)
        self.is_trained_ = restored or self.is_trained_
        if restored:
            kept = f"{what}; keeping the weights of epoch {keep_best.best_epoch}."
            warnings.warn(kept, UserWarning, stacklevel=settings.warnings_stacklevel + 1)

    # ------------------------------------------------------------ data loading
    def _make_data_loader(
        self, adata, indices=None, batch_size=None, shuffle=False, data_loader_class=None, **kwargs
    ):
        if indices is not None:  # scvi-tools' get_elbo and others pass the user's indices here
            indices = self._indices(self.adata if adata is None else adata, indices)
        kwargs.setdefault("max_cells_per_context", self.max_cells_per_context)
        kwargs.setdefault(
            "max_cells_per_batch", max(batch_size or DEFAULT_MAX_CELLS_PER_BATCH, self.max_cells_per_context)
        )
        return super()._make_data_loader(adata, indices, None, shuffle, data_loader_class, **kwargs)

    def _context_batches(
        self, adata, indices, batch_size, silent: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Minibatches holding every requested cell with its whole unit as context (module in eval mode)."""
        self.module.eval()
        manager = self.get_anndata_manager(adata, required=True)
        data = tissue_data(manager, self.max_cells_per_context)
        index = data.index
        units = index.units_containing(indices)
        context = np.sort(index.cells_of_units(units))
        # Large units go one per forward pass and small ones are packed: peak memory follows the
        # largest unit, not the training budget (the result does not depend on the packing).
        largest_unit = int(index.unit_sizes[units].max(initial=0))
        default = inference_cells_per_batch(self.module.n_hidden)
        budget = max(batch_size or default, largest_unit)
        loader = self._make_data_loader(
            adata=adata, indices=context, max_cells_per_batch=budget, with_measured=False, data=data
        )
        return track(
            loader, description="CellPLM inference", disable=silent, style=settings.progress_bar_style
        )

    def _autocast(self, precision: str):
        """Context of an inference pass at ``precision`` (``"32"`` or ``"bf16-mixed"``)."""
        if precision == "32":
            return contextlib.nullcontext()
        if precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        raise ValueError(f"precision must be '32' or 'bf16-mixed', got {precision!r}.")

    def _indices(self, adata: AnnData, indices: Sequence[int] | None) -> np.ndarray:
        """``indices`` (integer positions or a boolean mask over all cells) as int64 positions.

        Raises ``IndexError``, as numpy indexing would, for a mask of the wrong length,
        non-integer values, more than one dimension or positions outside ``[0, n_obs)``.
        """
        if indices is None:
            return np.arange(adata.n_obs)
        indices = np.asarray(indices)
        if indices.ndim != 1:
            raise IndexError(f"indices must be one-dimensional; got shape {indices.shape}.")
        if indices.dtype == bool:
            if len(indices) != adata.n_obs:
                raise IndexError(
                    f"A boolean mask of indices needs one value per cell ({adata.n_obs}); got {len(indices)}."
                )
            return np.flatnonzero(indices)
        if len(indices) == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(indices.dtype, np.integer):
            raise IndexError(
                f"indices must be integer positions or a boolean mask; got dtype {indices.dtype} "
                f"(e.g. {indices[:3].tolist()})."
            )
        if indices.min() < 0 or indices.max() >= adata.n_obs:
            raise IndexError(
                f"indices must lie in [0, {adata.n_obs}); got values from {indices.min()} to {indices.max()}."
            )
        return indices.astype(np.int64)

    # --------------------------------------------------------------- outputs
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 1,
        batch_size: int | None = None,
        return_dist: bool = False,
        precision: Literal["32", "bf16-mixed"] = "32",
        **kwargs,
    ) -> np.ndarray:
        """Cell embeddings ``z``, each computed with the cell's whole tissue (or tile) as context.

        Parameters
        ----------
        adata
            AnnData with the model's setup (default: the training data).
        indices
            Cells to return, in this order (default: all).
        give_mean
            Return the posterior mean (deterministic); otherwise one sample of ``q(z|x)``.
        mc_samples
            Unused; kept for scvi-tools compatibility.
        batch_size
            Cell budget per forward pass (default ``2**19 / n_hidden``, at least 1,024; raised to
            the largest tissue unit among the requested cells). Does not change the result.
        return_dist
            Return ``(mean, variance)`` of ``q(z|x)`` instead.
        precision
            ``"32"``: float32 throughout. ``"bf16-mixed"``: matrix products in bfloat16 under
            :func:`torch.autocast` (on GPUs and on CPUs with bfloat16 matrix units, several times
            faster; embeddings then differ from float32 by about 1 % of their norm; see
            ``docs/benchmarks.md``).

        Returns
        -------
        ``(len(indices), n_latent)`` float32 array (or two, with ``return_dist``).
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        indices = self._indices(adata, indices)
        n_latent = self.module.n_latent
        means = np.zeros((adata.n_obs, n_latent), dtype=np.float32)
        variances = np.zeros_like(means) if return_dist else None
        autocast = self._autocast(precision)
        for tensors in self._context_batches(adata, indices, batch_size):
            with autocast:
                out = self.module.inference(**self.module._get_inference_input(tensors))
            rows = tensors[BATCH_KEYS.OBS_INDEX].numpy()
            z = out["z"] if give_mean else out["qz"].sample()
            means[rows] = z.float().cpu().numpy()
            if return_dist:
                variances[rows] = out["qz"].variance.float().cpu().numpy()
        if return_dist:
            return means[indices], variances[indices]
        return means if np.array_equal(indices, np.arange(adata.n_obs)) else means[indices]

    @torch.inference_mode()
    def get_cluster_probabilities(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Mixture-component probabilities ``q(y|.)`` at inference: ``(len(indices), n_components)``.

        Only for the mixture latents (``latent="gmm"`` or ``"released_gmm"``).
        """
        if self.module.latent_kind not in ("gmm", "released_gmm"):
            raise ValueError(
                f"Cluster probabilities need a mixture latent ('gmm' or 'released_gmm'); this model has "
                f"latent={self.module.latent_kind!r}."
            )
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        indices = self._indices(adata, indices)
        result = np.zeros((adata.n_obs, self.module.latent.n_components), dtype=np.float32)
        for tensors in self._context_batches(adata, indices, batch_size):
            logits = self.module.inference(**self.module._get_inference_input(tensors))[
                "latent"
            ].cluster_logits
            result[tensors[BATCH_KEYS.OBS_INDEX].numpy()] = torch.softmax(logits, -1).cpu().numpy()
        return result[indices]

    def get_cluster_assignments(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
    ) -> pd.Categorical:
        """Most probable mixture component of each cell, as a categorical of component numbers."""
        probabilities = self.get_cluster_probabilities(adata, indices, batch_size)
        return pd.Categorical(probabilities.argmax(1), categories=np.arange(probabilities.shape[1]))

    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: Sequence[str | int] | str | int | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | Literal["latent"] = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: Literal["uniform"] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        **kwargs,
    ) -> np.ndarray | pd.DataFrame:
        """Denoised expression, with scvi-tools' semantics (so that ``differential_expression`` works).

        Parameters
        ----------
        adata, indices
            Cells (each computed with its whole tissue as context).
        transform_batch
            Batch categories to decode every cell as; the result is averaged over them
            (default: each cell's own batch).
        gene_list
            Genes to return (default: all).
        library_size
            Scale each cell's expression to this total, or ``"latent"`` for its observed library.
        n_samples
            Posterior samples of ``z`` per cell.
        n_samples_overall
            Draw this many cells at random from ``indices`` (used by differential expression).
        weights
            Only ``"uniform"`` (or ``None``) is supported.
        batch_size
            Cell budget per forward pass.
        return_mean
            Average over ``n_samples``.
        return_numpy
            Return an array instead of a DataFrame (forced when samples are kept).
        silent
            Hide the progress bar.

        Returns
        -------
        ``(n_cells, n_genes)`` DataFrame or array; ``(n_samples, n_cells, n_genes)`` when samples
        are kept.
        """
        if weights not in (None, "uniform"):
            raise ValueError("CellPLM supports weights='uniform' only.")
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        indices = self._indices(adata, indices)
        if n_samples_overall is not None:
            indices = np.random.choice(indices, n_samples_overall)
        var_names = manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
        genes = np.arange(len(var_names)) if gene_list is None else _gene_positions(var_names, gene_list)
        if transform_batch is None or isinstance(transform_batch, str | int):
            transform_batch = [transform_batch]
        codes = _get_batch_code_from_category(manager, transform_batch)
        result = np.zeros((n_samples, adata.n_obs, len(genes)), dtype=np.float32)
        for tensors in self._context_batches(adata, np.unique(indices), batch_size, silent):
            out = self.module.inference(**self.module._get_inference_input(tensors))
            z = (
                out["qz"].sample((n_samples,))
                if n_samples > 1 and out["qz"] is not None
                else out["z"].expand(n_samples, -1, -1)
            )
            expression = 0
            for code in codes:
                logits = self.module.generative(z, tensors[BATCH_KEYS.BATCH], transform_batch=code)[
                    "px_logits"
                ]
                expression = expression + self.module.normalized_expression(logits)[..., genes] / len(codes)
            if library_size == "latent":
                expression = expression * library_sizes(tensors).to(z.device)
            else:
                expression = expression * library_size
            result[:, tensors[BATCH_KEYS.OBS_INDEX].numpy()] = expression.cpu().numpy()
        result = result[:, indices]
        if n_samples > 1 and not return_mean:
            return result
        result = result.mean(0)
        if return_numpy or (return_numpy is None and n_samples_overall is not None):
            return result
        return pd.DataFrame(result, index=adata.obs_names[indices], columns=np.asarray(var_names)[genes])

    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Counts drawn from the negative-binomial posterior predictive.

        Returns
        -------
        ``(n_cells, n_genes)`` array, or ``(n_cells, n_genes, n_samples)`` when ``n_samples > 1``.
        """
        self._check_if_trained(warn=False)
        adata = self._validate_anndata(adata)
        manager = self.get_anndata_manager(adata, required=True)
        indices = self._indices(adata, indices)
        var_names = manager.get_state_registry(REGISTRY_KEYS.X_KEY).column_names
        genes = np.arange(len(var_names)) if gene_list is None else _gene_positions(var_names, gene_list)
        shape = (adata.n_obs, len(genes)) + ((n_samples,) if n_samples > 1 else ())
        result = np.zeros(shape, dtype=np.float32)
        for tensors in self._context_batches(adata, np.unique(indices), batch_size):
            result[tensors[BATCH_KEYS.OBS_INDEX].numpy()] = self.module.sample(tensors, n_samples)[
                :, genes
            ].numpy()
        return result[indices]


def _gene_positions(var_names: Sequence[str], gene_list: Sequence[str]) -> np.ndarray:
    position = pd.Index(var_names).get_indexer(gene_list)
    if (position < 0).any():
        missing = [g for g, p in zip(gene_list, position, strict=True) if p < 0]
        raise KeyError(f"{len(missing)} genes of gene_list are not in the model's genes, e.g. {missing[:5]}.")
    return position


def _warn_if_not_counts(matrix, where: str) -> None:
    if not check_counts(matrix, where):
        warnings.warn(
            f"{where} holds non-integer values, but CellPLM models raw counts (negative binomial). Pass the "
            "raw counts with layer=... (e.g. layer='counts').",
            UserWarning,
            stacklevel=settings.warnings_stacklevel + 1,
        )


def _with_defaults_of_its_version(init_params: dict) -> None:
    """Give a model saved before an argument existed that argument's value of its time, in place.

    Models saved before 0.2 have no ``batch_in_decoder``: their decoder adds the batch to ``z``.
    """
    module_kwargs = init_params.get("kwargs", {}).setdefault("module_kwargs", {})
    module_kwargs.setdefault("batch_in_decoder", "latent")


#: Where a registry holds the model's genes, as Python subscripts (for messages).
_GENES = f"['field_registries'][{REGISTRY_KEYS.X_KEY!r}]['state_registry']['column_names']"


def _registered_genes(registry: dict) -> np.ndarray:
    return registry["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"]


def _genes_of(adata: AnnData | MuData, registry: dict) -> pd.Index:
    """Gene names of ``adata``: of its RNA modality for data set up with :meth:`CellPLM.setup_mudata`."""
    if isinstance(adata, MuData):
        return adata.mod[registry["setup_args"]["modalities"]["rna_layer"]].var_names
    return adata.var_names


def _read_saved_data(dir_path: Path, prefix: str | None, registry: dict) -> AnnData | MuData | Literal[False]:
    """The data saved beside the model (``save(save_anndata=True)``), or ``False`` with a warning."""
    is_mudata = registry.get("setup_method_name") == "setup_mudata"
    path = dir_path / f"{prefix or ''}{SAVE_KEYS.MDATA_FNAME if is_mudata else SAVE_KEYS.ADATA_FNAME}"
    if not path.exists():
        warnings.warn(
            f"{dir_path} holds no saved data and no adata was passed; the model is loaded without data.",
            UserWarning,
            stacklevel=settings.warnings_stacklevel,
        )
        return False
    return mudata.read_h5mu(path) if is_mudata else anndata.read_h5ad(path)
