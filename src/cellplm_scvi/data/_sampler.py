"""Packing whole units (tissues or tiles) into minibatches under a cell budget."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def pack_units(order: np.ndarray, sizes: np.ndarray, max_cells: int) -> list[list[int]]:
    """Pack units, in the given order, into consecutive minibatches of at most ``max_cells`` cells.

    Next-fit: a minibatch is closed when the next unit would overflow it. A unit larger than the
    budget is an error (the model checks ``max_cells_per_batch >= max_cells_per_context``).

    Parameters
    ----------
    order
        Unit ids in the order to pack them.
    sizes
        ``(U,)`` cells per unit.
    max_cells
        Cell budget of a minibatch.

    Returns
    -------
    The unit ids of each minibatch.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for unit in order.tolist():
        size = int(sizes[unit])
        if size > max_cells:
            raise ValueError(
                f"A tissue unit of {size} cells does not fit a minibatch of {max_cells} cells; "
                "raise max_cells_per_batch or lower max_cells_per_context."
            )
        if current and filled + size > max_cells:
            batches.append(current)
            current, filled = [], 0
        current.append(unit)
        filled += size
    if current:
        batches.append(current)
    return batches


def shard_units(order: np.ndarray, sizes: np.ndarray, n_replicas: int) -> list[np.ndarray]:
    """Deal units to replicas so that each holds nearly the same number of cells.

    Largest units first, each to the replica with the fewest cells so far (LPT scheduling);
    within a replica the units keep their relative position in ``order``.
    """
    load = np.zeros(n_replicas, dtype=np.int64)
    owner = np.empty(len(sizes), dtype=np.int64)
    for unit in order[np.argsort(-sizes[order], kind="stable")].tolist():
        replica = int(np.argmin(load))
        owner[unit] = replica
        load[replica] += sizes[unit]
    return [order[owner[order] == r] for r in range(n_replicas)]


class TissuePackingSampler(Sampler[list[int]]):
    """Yield minibatches of whole units whose cells add up to at most ``max_cells_per_batch``.

    Every unit appears exactly once per epoch. With ``shuffle`` the unit order (and so the
    packing) changes each epoch as a function of ``(seed, epoch)``, so :meth:`__len__` is exact for
    the epoch set with :meth:`set_epoch`. Under distributed training each replica gets a share of
    the units balanced by cells, and replicas with fewer minibatches repeat their first ones so
    that all replicas take the same number of steps.

    Parameters
    ----------
    unit_sizes
        ``(U,)`` cells per unit.
    max_cells_per_batch
        Cell budget of a minibatch.
    shuffle
        Shuffle unit order every epoch.
    seed
        Seed of the shuffling.
    distributed
        Shard units across the replicas of an initialised :mod:`torch.distributed` group.
    """

    def __init__(
        self,
        unit_sizes: np.ndarray,
        max_cells_per_batch: int,
        shuffle: bool = False,
        seed: int = 0,
        distributed: bool = False,
    ):
        if max_cells_per_batch < 1:
            raise ValueError(
                f"max_cells_per_batch must be a positive number of cells, got {max_cells_per_batch}."
            )
        self.unit_sizes = np.asarray(unit_sizes, dtype=np.int64)
        self.max_cells_per_batch = int(max_cells_per_batch)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        if distributed and dist.is_available() and dist.is_initialized():
            self.n_replicas, self.rank = dist.get_world_size(), dist.get_rank()
        else:
            self.n_replicas, self.rank = 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose unit order :meth:`__iter__` and :meth:`__len__` describe."""
        self.epoch = int(epoch)

    def plan(self) -> list[list[int]]:
        """The minibatches (unit ids) of this replica for the current epoch."""
        n_units = len(self.unit_sizes)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n_units, generator=generator).numpy()
        else:
            order = np.arange(n_units)
        if self.n_replicas == 1:
            return pack_units(order, self.unit_sizes, self.max_cells_per_batch)
        plans = [
            pack_units(o, self.unit_sizes, self.max_cells_per_batch)
            for o in shard_units(order, self.unit_sizes, self.n_replicas)
        ]
        n_steps = max(len(p) for p in plans)
        mine = plans[self.rank] or [[int(order[0])]]
        return [mine[i % len(mine)] for i in range(n_steps)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.plan())

    def __len__(self) -> int:
        return len(self.plan())
