"""Data loaders and the tissue-level train/validation splitter, wired to scvi-tools' registry."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import numpy as np
import scipy.sparse as sp
from scvi import REGISTRY_KEYS, settings
from scvi.data import AnnDataManager
from torch.utils.data import DataLoader

from cellplm_scvi._constants import CELLPLM_REGISTRY_KEYS

from ._sampler import TissuePackingSampler
from ._tissues import TissueIndex, build_tissue_index, random_chunks, spatial_tiles, stable_cell_keys
from ._token_sets import TissueData, TokenSetDataset

logger = logging.getLogger(__name__)

DEFAULT_MAX_CELLS_PER_CONTEXT = 4000
DEFAULT_MAX_CELLS_PER_BATCH = 4000


def _codes(adata_manager: AnnDataManager, key: str) -> np.ndarray:
    return np.asarray(adata_manager.get_from_registry(key)).reshape(-1).astype(np.int64)


def tissue_data(adata_manager: AnnDataManager, max_cells_per_context: int, seed: int = 0) -> TissueData:
    """Read what the pipeline needs from a registered AnnData: counts, batches, coordinates and the tissue index.

    A tissue is one (batch, fov) pair. Reading costs about 1 % of an embedding pass over the same
    cells, so nothing is cached: the data splitter reads once per training run, and every
    inference call reads afresh and sees the AnnData as it is.
    """
    batch = _codes(adata_manager, REGISTRY_KEYS.BATCH_KEY)
    fov = _codes(adata_manager, CELLPLM_REGISTRY_KEYS.FOV_KEY)
    pair = batch * (int(fov.max(initial=0)) + 1) + fov  # (batch, fov) in lexicographic order
    tissue = np.unique(pair, return_inverse=True)[1].reshape(-1)
    coords = None
    if CELLPLM_REGISTRY_KEYS.SPATIAL_KEY in adata_manager.data_registry:
        coords = np.asarray(
            adata_manager.get_from_registry(CELLPLM_REGISTRY_KEYS.SPATIAL_KEY), dtype=np.float64
        )[:, :2]
    matrix = adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
    if sp.issparse(matrix):
        if matrix.format == "csc":
            matrix = matrix.tocsr()  # row slicing of CSC is slow; one conversion, nnz-sized
        if not matrix.has_canonical_format:
            # Duplicate entries of a cell and gene add up (scipy's meaning); the pipeline reads each
            # stored value as a whole count, so they are summed, on a copy of the user's matrix.
            matrix = matrix.copy()
            matrix.sum_duplicates()
    return TissueData(
        matrix=matrix,
        batch_codes=batch,
        coords=coords,
        index=build_tissue_index(
            tissue, adata_manager.adata.obs_names.to_numpy(), coords, max_cells_per_context, seed
        ),
        n_batch=adata_manager.summary_stats.n_batch,
    )


class TissueDataLoader(DataLoader):
    """Loader of token sets over the cells ``indices`` of a registered AnnData.

    Cells are served with their unit (tissue or tile) as context, restricted to ``indices``;
    minibatches pack whole units up to ``max_cells_per_batch`` cells. The signature accepts what
    scvi-tools passes to data loaders (``batch_size`` is read as the cell budget when
    ``max_cells_per_batch`` is not given; ``drop_last`` and ``load_sparse_tensor`` are ignored:
    counts are always sparse and units are never cut by the loader).

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    indices
        Cells to serve; all when ``None``.
    shuffle
        Shuffle units every epoch.
    max_cells_per_batch
        Cell budget of a minibatch.
    max_cells_per_context
        Context limit (largest unit).
    drop_cell_rate
        Training-time context dropout (see :class:`~cellplm_scvi.data.TokenSetDataset`).
    with_measured
        Serve the measured-gene table that masking and the loss need (see
        :class:`~cellplm_scvi.data.TokenSetDataset`).
    epoch
        Epoch whose shuffle order to serve first.
    distributed_sampler
        Shard units across distributed replicas.
    data
        What :func:`tissue_data` read from the AnnData, when the caller has it already.
    **kwargs
        Passed on to :class:`torch.utils.data.DataLoader` (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        indices: np.ndarray | None = None,
        shuffle: bool = False,
        batch_size: int | None = None,
        max_cells_per_batch: int | None = None,
        max_cells_per_context: int = DEFAULT_MAX_CELLS_PER_CONTEXT,
        drop_cell_rate: float = 0.0,
        with_measured: bool = True,
        epoch: int = 0,
        distributed_sampler: bool = False,
        data: TissueData | None = None,
        **kwargs,
    ):
        for ignored in (
            "drop_last",
            "load_sparse_tensor",
            "data_and_attributes",
            "iter_ndarray",
            "drop_dataset_tail",
        ):
            kwargs.pop(ignored, None)
        if kwargs.get("num_workers", 0) == 0:
            kwargs.pop("persistent_workers", None)
        budget = max_cells_per_batch or batch_size or DEFAULT_MAX_CELLS_PER_BATCH
        if data is None:
            data = tissue_data(adata_manager, max_cells_per_context)
        index = data.index if indices is None else data.index.restrict(np.asarray(indices))
        self.tissue_index = index
        sampler = TissuePackingSampler(
            index.unit_sizes,
            budget,
            shuffle=shuffle,
            seed=settings.seed or 0,
            distributed=distributed_sampler,
        )
        sampler.set_epoch(epoch)
        super().__init__(
            TokenSetDataset(data, index, drop_cell_rate, with_measured),
            sampler=sampler,
            batch_size=None,
            **kwargs,
        )


def split_units(
    index: TissueIndex,
    coords: np.ndarray | None,
    obs_names: np.ndarray,
    train_size: float,
    validation_size: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split cells into train / validation / test by whole units.

    Units are taken in a seeded random order: validation first, until its share of cells is
    reached, then test, the rest train. A tissue is then never in two splits. When no whole unit
    is small enough (every unit holds more than twice the validation share, e.g. one tissue, or
    two large FOVs), the units are first cut into pieces of about the validation share (tiles
    with coordinates, chunks without) and the split is made over the pieces.

    Returns
    -------
    Sorted obs indices of the train, validation and test cells.
    """
    pieces = [index.unit(u) for u in range(index.n_units)]
    n_validation = validation_size * sum(len(p) for p in pieces)
    if validation_size > 0 and min(len(p) for p in pieces) > 2 * n_validation:
        max_piece = max(1, int(np.ceil(n_validation)))
        cut = []
        for cells in pieces:
            keys = stable_cell_keys(obs_names[cells], seed)
            parts = (
                spatial_tiles(coords[cells], keys, max_piece)
                if coords is not None
                else random_chunks(keys, max_piece)
            )
            cut += [cells[p] for p in parts]
        pieces = cut
    order = np.random.default_rng(seed).permutation(len(pieces))
    n_cells = sum(len(p) for p in pieces)
    targets = {"validation": validation_size * n_cells, "test": (1 - train_size - validation_size) * n_cells}
    assigned = {"validation": [], "test": [], "train": []}
    filled = dict.fromkeys(targets, 0)
    for i in order:
        split = next(
            (
                s
                for s in ("validation", "test")
                if targets[s] > 0 and filled[s] < targets[s] and len(pieces) > 1
            ),
            "train",
        )
        if split != "train":
            filled[split] += len(pieces[i])
        assigned[split].append(pieces[i])
    if not assigned["train"]:
        raise ValueError("The split leaves no tissue for training; lower validation_size or add tissues.")
    join = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return join(assigned["train"]), join(assigned["validation"]), join(assigned["test"])


class TissueDataSplitter(pl.LightningDataModule):
    """Tissue-level train / validation / test split with token-set loaders.

    Accepts every keyword scvi-tools' ``UnsupervisedTrainingMixin.train`` passes to a splitter.
    ``train_idx``, ``val_idx``, ``test_idx`` (cell indices) and ``n_train``, ``n_val`` are set at
    construction.

    Parameters
    ----------
    adata_manager
        Manager of the registered AnnData.
    train_size
        Share of cells for training (default 0.9).
    validation_size
        Share of cells for validation (default ``1 - train_size``).
    shuffle_set_split
        Randomise which units go to which split (seeded by ``scvi.settings.seed``).
    max_cells_per_batch
        Cell budget of a minibatch.
    max_cells_per_context
        Context limit.
    drop_cell_rate
        Training-time context dropout.
    **kwargs
        Passed to the loaders.
    """

    def __init__(
        self,
        adata_manager: AnnDataManager,
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int | None = None,
        max_cells_per_batch: int | None = None,
        max_cells_per_context: int = DEFAULT_MAX_CELLS_PER_CONTEXT,
        drop_cell_rate: float = 0.0,
        distributed_sampler: bool = False,
        load_sparse_tensor: bool = False,
        **kwargs,
    ):
        super().__init__()
        train_size = 0.9 if train_size is None else float(train_size)
        validation_size = 1.0 - train_size if validation_size is None else float(validation_size)
        if not (
            0 < train_size <= 1 and 0 <= validation_size < 1 and train_size + validation_size <= 1 + 1e-9
        ):
            raise ValueError(
                f"Invalid split: train_size={train_size}, validation_size={validation_size}; "
                "both must be shares in [0, 1] adding up to at most 1."
            )
        self.adata_manager = adata_manager
        self.loader_kwargs = {
            "max_cells_per_batch": max_cells_per_batch or batch_size,
            "max_cells_per_context": max_cells_per_context,
            "distributed_sampler": distributed_sampler,
            **kwargs,
        }
        self.drop_cell_rate = drop_cell_rate
        self.data = tissue_data(adata_manager, max_cells_per_context)
        data = self.data
        seed = (settings.seed or 0) if shuffle_set_split else 0
        self.train_idx, self.val_idx, self.test_idx = split_units(
            data.index,
            data.coords,
            adata_manager.adata.obs_names.to_numpy(),
            train_size,
            validation_size,
            seed,
        )
        self.n_train, self.n_val = len(self.train_idx), len(self.val_idx)
        logger.info(f"Tissue-level split: {self.n_train} training cells, {self.n_val} validation cells.")

    def _loader(self, indices: np.ndarray, shuffle: bool, drop_cell_rate: float = 0.0) -> TissueDataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return TissueDataLoader(
            self.adata_manager,
            indices,
            shuffle=shuffle,
            drop_cell_rate=drop_cell_rate,
            epoch=epoch,
            data=self.data,
            **self.loader_kwargs,
        )

    def train_dataloader(self) -> TissueDataLoader:
        """Shuffled loader over the training tissues, with context dropout."""
        return self._loader(self.train_idx, shuffle=True, drop_cell_rate=self.drop_cell_rate)

    def val_dataloader(self) -> TissueDataLoader | list:
        """Loader over the validation tissues (an empty list when there are none)."""
        return self._loader(self.val_idx, shuffle=False) if self.n_val else []

    def test_dataloader(self) -> TissueDataLoader | list:
        """Loader over the test tissues (an empty list when there are none)."""
        return self._loader(self.test_idx, shuffle=False) if len(self.test_idx) else []
