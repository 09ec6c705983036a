"""CPU strategies: faster ways to compute, on a CPU, exactly what the reference modules compute.

The modules of :mod:`cellplm_scvi.nn` are written as the model's maths in plain PyTorch and run
as written on every device. On a CPU, four of them hand their work to a strategy here, which
gives the same result to float rounding (``tests/test_cpu_strategies.py`` holds each to its
reference) and names the benchmark that chose it:

==================  ==========================================================  ===============================
strategy            what it does                                                benchmark
==================  ==========================================================  ===============================
``encoder_blocks``  encoder without autograd, every layer in row blocks         ``embedding_speed.py``
``flow_attention``  flow attention per tissue in blocks, or packed tissues      ``attention_packing.py``
``gene_bag``        embedder: dense product or cache-sized column blocks        ``embedder_paths.py``
``nb_likelihood``   NB loss in row chunks with its backward written out         ``training_speed.py``
==================  ==========================================================  ===============================

All are on by default. :func:`use_cpu_strategies` is the switch: ``use_cpu_strategies(False)``
runs the reference everywhere; :func:`cpu_strategies` does the same for a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from . import _attention
from ._attention import flow_attention
from ._embedder import gene_bag
from ._encoder import encoder_in_blocks
from ._likelihood import nb_reconstruction

STRATEGIES = ("encoder_blocks", "flow_attention", "gene_bag", "nb_likelihood")
_enabled = set(STRATEGIES)


def use_cpu_strategies(enabled: bool | Iterable[str] = True) -> None:
    """Switch the CPU strategies on (``True``), off (``False``), or on for the names given only."""
    names = set(STRATEGIES) if enabled is True else set() if enabled is False else set(enabled)
    unknown = names - set(STRATEGIES)
    if unknown:
        raise ValueError(f"Unknown CPU strategies {sorted(unknown)}; choose from {list(STRATEGIES)}.")
    _enabled.clear()
    _enabled.update(names)


@contextlib.contextmanager
def cpu_strategies(enabled: bool | Iterable[str] = True) -> Iterator[None]:
    """:func:`use_cpu_strategies` for the duration of a ``with`` block."""
    before = set(_enabled)
    use_cpu_strategies(enabled)
    try:
        yield
    finally:
        use_cpu_strategies(before)


def enabled_strategies() -> tuple[str, ...]:
    """The strategies switched on, in the order of :data:`STRATEGIES`."""
    return tuple(name for name in STRATEGIES if name in _enabled)


def _on_cpu(name: str, x: torch.Tensor) -> bool:
    return name in _enabled and x.device.type == "cpu"


def encoder_in_blocks_applies(encoder, x: torch.Tensor) -> bool:
    """Whether :func:`encoder_in_blocks` runs ``encoder`` on ``(N, D)`` ``x``.

    On a CPU, for more than one block of cells, in evaluation mode, without autograd or autocast.
    """
    return (
        _on_cpu("encoder_blocks", x)
        and len(encoder.layers) > 0
        and not encoder.training
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and x.shape[0] > _attention.block_rows(x.shape[1])
    )


def flow_attention_applies(q: torch.Tensor) -> bool:
    """Whether :func:`flow_attention` attends the ``(N, H, d)`` heads ``q``."""
    return _on_cpu("flow_attention", q)


def gene_bag_applies(embedder, values: torch.Tensor) -> bool:
    """Whether :func:`gene_bag` embeds a batch with stored counts ``values``."""
    return _on_cpu("gene_bag", values) and values.numel() > 0


def nb_reconstruction_applies(logits: torch.Tensor) -> bool:
    """Whether :func:`nb_reconstruction` scores the ``(S, G)`` ``logits``."""
    return _on_cpu("nb_likelihood", logits)


__all__ = [
    "STRATEGIES",
    "cpu_strategies",
    "enabled_strategies",
    "encoder_in_blocks",
    "encoder_in_blocks_applies",
    "flow_attention",
    "flow_attention_applies",
    "gene_bag",
    "gene_bag_applies",
    "nb_reconstruction",
    "nb_reconstruction_applies",
    "use_cpu_strategies",
]
