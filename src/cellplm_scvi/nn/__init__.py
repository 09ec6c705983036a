"""Neural-network building blocks of CellPLM: embedder, positional encoding, attention, encoder, latent, decoder."""

from ._activation import GELU
from ._attention import FlowAttention, SoftmaxAttention
from ._decoder import BatchAwareDecoder
from ._dropout import Dropout
from ._embedder import GeneBagEmbedder, TokenProjection
from ._encoder import CellEncoder, CellTransformerLayer
from ._latent import (
    DeterministicLatent,
    GaussianMixtureLatent,
    LatentOutput,
    NormalLatent,
    ReleasedGaussianMixtureLatent,
)
from ._norm import GroupNorm
from ._positional import Sinusoidal2dEncoding

__all__ = [
    "BatchAwareDecoder",
    "CellEncoder",
    "CellTransformerLayer",
    "DeterministicLatent",
    "Dropout",
    "FlowAttention",
    "GELU",
    "GaussianMixtureLatent",
    "GeneBagEmbedder",
    "GroupNorm",
    "LatentOutput",
    "NormalLatent",
    "ReleasedGaussianMixtureLatent",
    "Sinusoidal2dEncoding",
    "SoftmaxAttention",
    "TokenProjection",
]
