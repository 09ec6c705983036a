"""Neural-network building blocks of CellPLM: embedder, positional encoding, attention, encoder, latent, decoder, likelihood.

Each module is the model's maths in plain PyTorch; :mod:`cellplm_scvi.nn.cpu` holds the faster
CPU strategies that some of them hand their work to.
"""

from . import cpu
from ._attention import (
    ATTENTION_KINDS,
    SEPARATE_PROJECTIONS,
    FlowAttention,
    SoftmaxAttention,
    fuse_projections,
)
from ._decoder import RELEASED_LOGIT_RANGE, BatchAwareDecoder
from ._embedder import GeneBagEmbedder, TokenProjection
from ._encoder import CellEncoder, CellTransformerLayer
from ._latent import (
    LATENT_KINDS,
    GaussianMixtureLatent,
    LatentOutput,
    NormalLatent,
    ReleasedGaussianMixtureLatent,
)
from ._likelihood import entry_weights, nb_reconstruction
from ._positional import Sinusoidal2dEncoding
from ._segments import csr_rows, segment_ids, segment_sum

__all__ = [
    "BatchAwareDecoder",
    "CellEncoder",
    "CellTransformerLayer",
    "FlowAttention",
    "GaussianMixtureLatent",
    "GeneBagEmbedder",
    "LatentOutput",
    "NormalLatent",
    "ReleasedGaussianMixtureLatent",
    "Sinusoidal2dEncoding",
    "SoftmaxAttention",
    "TokenProjection",
    "cpu",
    "csr_rows",
    "entry_weights",
    "fuse_projections",
    "nb_reconstruction",
    "segment_ids",
    "segment_sum",
]
