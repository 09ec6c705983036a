"""CellPLMModule: masked denoising ELBO over tissues of cells, as an scvi-tools module."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from scvi import settings
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from torch import nn

from cellplm_scvi._constants import BATCH_KEYS
from cellplm_scvi.nn import (
    ATTENTION_KINDS,
    LATENT_KINDS,
    RELEASED_LOGIT_RANGE,
    BatchAwareDecoder,
    CellEncoder,
    GeneBagEmbedder,
    LatentOutput,
    Sinusoidal2dEncoding,
    TokenProjection,
    csr_rows,
    nb_reconstruction,
    segment_ids,
    segment_sum,
)

from ._likelihood import library_sizes, stored_entries

_INFERENCE_KEYS = (
    BATCH_KEYS.X_INDPTR,
    BATCH_KEYS.X_INDICES,
    BATCH_KEYS.X_DATA,
    BATCH_KEYS.SEGMENT_PTR,
    BATCH_KEYS.COORDS,
    BATCH_KEYS.HAS_COORDS,
)
_MASKING_KEYS = (BATCH_KEYS.MEASURED, BATCH_KEYS.MEASURED_ROW)
"""Inference needs these only to mask genes in training; minibatches served for inference alone leave them out."""

RELEASED_BOTTLENECK = 128
"""Width of the released decoder head's bottleneck."""

_DEPRECATED_LATENTS = {"gmvae": "released_gmm"}
_DEPRECATED_LAYOUT_ARGUMENTS = (
    "decoder_batch_injection",
    "decoder_bottleneck",
    "n_pretrained_datasets",
    "n_gene_table",
    "gene_rows",
)


def _renamed_arguments(
    latent: str, released_layout: dict | None, deprecated: dict
) -> tuple[str, dict | None]:
    """Map the arguments renamed in 0.2 to their new names, with a warning; refuse unknown ones."""
    unknown = set(deprecated) - set(_DEPRECATED_LAYOUT_ARGUMENTS)
    if unknown:
        raise TypeError(f"CellPLMModule got unexpected keyword arguments {sorted(unknown)}.")
    if latent in _DEPRECATED_LATENTS:
        warnings.warn(
            f"latent={latent!r} is now called latent={_DEPRECATED_LATENTS[latent]!r}; the old name goes in 0.3.",
            FutureWarning,
            stacklevel=settings.warnings_stacklevel,
        )
        latent = _DEPRECATED_LATENTS[latent]
    if deprecated:
        warnings.warn(
            f"{sorted(deprecated)} are replaced by released_layout={{'n_gene_table', 'gene_rows', "
            "'n_datasets'}; the old arguments go in 0.3.",
            FutureWarning,
            stacklevel=settings.warnings_stacklevel,
        )
        if deprecated.get("decoder_batch_injection", "latent") == "hidden":
            released_layout = {
                "n_gene_table": deprecated.get("n_gene_table"),
                "gene_rows": deprecated.get("gene_rows"),
                "n_datasets": deprecated.get("n_pretrained_datasets", 0),
            }
            released_layout = {k: v for k, v in released_layout.items() if v is not None}
    return latent, released_layout


def _choose(name: str, value: str, options) -> str:
    if value not in options:
        raise ValueError(f"Unknown {name}={value!r}; choose one of {sorted(options)}.")
    return value


class CellPLMModule(BaseModuleClass):
    """CellPLM: cells as tokens, a tissue as a sentence, a Gaussian-mixture latent, a masked denoising objective.

    Forward pass for a minibatch of ``N`` cells in ``T`` packed tissues:

    1. training only: in each tissue ``mask_cell_rate * n`` cells, rounded up or down at random
       (so that tissues of a few cells are masked at the same rate on average), are chosen and each of
       their *measured* genes is masked (set to zero in the input) with probability
       ``mask_gene_rate``;
    2. token ``e = log1p(x) @ E`` (sparse), plus the 2-D sinusoidal encoding of the cell's position
       (a learned placeholder without coordinates), then ``GroupNorm(Dropout(ReLU(Linear(.))))``;
    3. ``n_layers`` pre-norm transformer layers, attention only within each tissue;
    4. LayerNorm, then the latent layer (``q(z|x)``, and ``q(y|z)`` for the mixture);
    5. batch-aware decoder: the batch embedding enters after every hidden block (or as ``z + b``).

    Parameters
    ----------
    n_input
        Number of genes ``G``.
    n_batch
        Number of batches.
    n_hidden
        Token / encoder width ``D``.
    n_layers
        Encoder layers.
    n_heads
        Attention heads.
    n_latent
        Latent width ``L``.
    n_components
        Mixture components ``K`` (mixture latents).
    latent
        ``"gmm"`` (the paper's Gaussian-mixture prior), ``"normal"`` (standard normal prior) or
        ``"released_gmm"`` (the mixture layout of the released ``20230926`` checkpoint).
    attention
        ``"flow"`` (Flowformer, linear in cells) or ``"softmax"`` (exact).
    n_decoder_hidden
        Width of the decoder's hidden blocks.
    n_decoder_layers
        Number of decoder hidden blocks.
    dropout
        Dropout rate throughout.
    mask_cell_rate
        Share of each tissue's cells that get masked genes in training.
    mask_gene_rate
        Share of a masked cell's measured genes that are masked.
    full_profile_weight
        Weight of the masked cells' full-profile term in the reconstruction loss.
    use_positional_encoding
        Add the spatial encoding (off for ablations).
    batch_in_decoder
        ``"every_block"``: the batch enters the decoder after every hidden block,
        ``h = block(h) + GroupNorm(PReLU(b))``, as scVI feeds it to every layer;
        ``"latent"``: only at the input, ``z + b`` (the paper's form, and the default before 0.2).
        On the 3-chemistry PBMC set every block integrates the batches (scib batch correction 0.68
        against 0.25) and separates the cell types better (``benchmarks/embedding_quality.py``).
    released_layout
        ``None``: this package's layout. For the released CellPLM checkpoints (set by
        :meth:`~cellplm_scvi.CellPLM.from_cellplm_checkpoint`), a dict with ``n_gene_table`` (rows
        of the pre-trained gene table), ``gene_rows`` (its rows of the input genes, any subset in
        any order) and ``n_datasets`` (rows of the dataset covariate table): the decoder then
        predicts the whole table and adds the batch after every hidden block, its head has a
        128-wide bottleneck and its logits are clamped as in the release; the likelihood reads
        the input genes' columns.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int,
        n_hidden: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_latent: int = 32,
        n_components: int = 16,
        latent: Literal["gmm", "normal", "released_gmm"] = "gmm",
        attention: Literal["flow", "softmax"] = "flow",
        n_decoder_hidden: int = 256,
        n_decoder_layers: int = 1,
        dropout: float = 0.1,
        mask_cell_rate: float = 0.75,
        mask_gene_rate: float = 0.25,
        full_profile_weight: float = 1.0,
        use_positional_encoding: bool = True,
        batch_in_decoder: Literal["every_block", "latent"] = "every_block",
        released_layout: dict | None = None,
        **deprecated,
    ):
        super().__init__()
        latent, released_layout = _renamed_arguments(latent, released_layout, deprecated)
        _choose("latent", latent, LATENT_KINDS)
        _choose("attention", attention, ATTENTION_KINDS)
        for name, size in {
            "n_input": n_input,
            "n_hidden": n_hidden,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "n_latent": n_latent,
            "n_components": n_components,
            "n_decoder_hidden": n_decoder_hidden,
        }.items():
            if int(size) < 1:
                raise ValueError(f"{name} must be a positive integer, got {size}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}.")
        for name, rate in {"mask_cell_rate": mask_cell_rate, "mask_gene_rate": mask_gene_rate}.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {rate}.")
        if n_hidden % 4 or n_decoder_hidden % 4:
            raise ValueError(
                f"n_hidden and n_decoder_hidden must be divisible by 4 (GroupNorm), got {n_hidden}, {n_decoder_hidden}."
            )
        self.n_input, self.n_batch, self.n_latent = n_input, n_batch, n_latent
        self.mask_cell_rate, self.mask_gene_rate = mask_cell_rate, mask_gene_rate
        self.full_profile_weight = full_profile_weight
        self.use_positional_encoding = use_positional_encoding
        _choose("batch_in_decoder", batch_in_decoder, ("every_block", "latent"))

        released = released_layout or {}
        n_table = int(released.get("n_gene_table", n_input))
        gene_rows = released.get("gene_rows")
        if gene_rows is not None and (
            len(gene_rows) != n_input or min(gene_rows) < 0 or max(gene_rows) >= n_table
        ):
            raise ValueError(f"gene_rows must hold {n_input} rows of a {n_table}-gene table.")
        rows = torch.arange(n_input) if gene_rows is None else torch.as_tensor(gene_rows, dtype=torch.long)
        self.register_buffer("gene_rows", rows, persistent=False)
        self.subset_genes = n_table != n_input or gene_rows is not None

        self.embedder = GeneBagEmbedder(n_table, n_hidden, gene_rows=rows)
        self.positional_encoding = Sinusoidal2dEncoding(n_hidden) if use_positional_encoding else None
        self.projection = TokenProjection(n_hidden, dropout)
        self.encoder = CellEncoder(n_hidden, n_layers, n_heads, dropout, attention)
        self.pre_latent_norm = nn.LayerNorm(n_hidden)
        latent_cls = LATENT_KINDS[latent]
        mixture = latent in ("gmm", "released_gmm")
        self.latent = (
            latent_cls(n_hidden, n_latent, n_components) if mixture else latent_cls(n_hidden, n_latent)
        )
        self.decoder = BatchAwareDecoder(
            n_latent,
            n_table,
            n_batch,
            n_decoder_hidden,
            n_decoder_layers,
            dropout,
            batch_injection="hidden" if released_layout or batch_in_decoder == "every_block" else "latent",
            bottleneck=RELEASED_BOTTLENECK if released_layout else None,
            n_datasets=int(released.get("n_datasets", 0)),
            logit_range=RELEASED_LOGIT_RANGE if released_layout else None,
        )
        self.log_dispersion = nn.Parameter(torch.zeros(n_table))

    @property
    def n_hidden(self) -> int:
        """Token / encoder width ``D``."""
        return self.embedder.n_hidden

    @property
    def latent_kind(self) -> str:
        """``"gmm"``, ``"normal"`` or ``"released_gmm"``."""
        return self.latent.kind

    # ---------------------------------------------------------------- masking
    def _mask(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose masked cells (``(N,)`` bool) and masked entries (``(N, G)`` bool, measured genes only)."""
        segment_ptr, measured_row = tensors[BATCH_KEYS.SEGMENT_PTR], tensors[BATCH_KEYS.MEASURED_ROW]
        n_cells, device = measured_row.numel(), measured_row.device
        segment = segment_ids(segment_ptr, n_cells)
        lengths = segment_ptr.diff()
        # rank of each cell within its tissue in a random order
        order = torch.argsort(segment.double() + torch.rand(n_cells, device=device, dtype=torch.float64))
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n_cells, device=device) - segment_ptr[:-1].repeat_interleave(lengths)
        # stochastic rounding: a tissue of n cells masks n * rate of them on average, even n = 1
        expected = lengths.double() * self.mask_cell_rate
        n_masked = (expected + torch.rand(lengths.numel(), device=device, dtype=torch.float64)).floor().long()
        masked_cells = rank < n_masked[segment]
        chosen = masked_cells.nonzero().squeeze(1)
        draws = torch.rand(chosen.numel(), self.n_input, device=device) < self.mask_gene_rate
        masked_entries = torch.zeros(n_cells, self.n_input, dtype=torch.bool, device=device)
        masked_entries[chosen] = draws & tensors[BATCH_KEYS.MEASURED][measured_row[chosen]]
        return masked_cells, masked_entries

    # -------------------------------------------------------------- inference
    def _get_inference_input(self, tensors: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        keys = _INFERENCE_KEYS + tuple(key for key in _MASKING_KEYS if key in tensors)
        return {key: tensors[key] for key in keys}

    @auto_move_data
    def inference(
        self,
        x_indptr: torch.Tensor,
        x_indices: torch.Tensor,
        x_data: torch.Tensor,
        segment_ptr: torch.Tensor,
        coords: torch.Tensor,
        has_coords: torch.Tensor,
        measured: torch.Tensor | None = None,
        measured_row: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict:
        """Encode a token set.

        Parameters are the minibatch tensors named in :data:`~cellplm_scvi._constants.BATCH_KEYS`
        (``measured`` and ``measured_row`` only where training masks genes);
        ``n_samples`` draws that many ``z`` (training) or repeats the mean (evaluation).

        Returns
        -------
        dict with ``z`` (``(N, L)`` or ``(S, N, L)``), ``qz`` (``Normal`` or ``None``), ``latent``
        (:class:`~cellplm_scvi.nn.LatentOutput`), ``masked_cells`` (``(N,)`` bool or ``None``),
        ``scored_cells`` (``(S,)`` positions of the masked cells, the ones the loss scores and the
        generative step decodes; ``None`` for all cells) and ``masked_entries`` (``(N, G)`` bool or
        ``None``).
        """
        masked_cells = scored_cells = masked_entries = None
        values = x_data
        if self.training and self.mask_cell_rate > 0 and self.mask_gene_rate > 0:
            if measured is None:
                raise ValueError("Masking in training needs the minibatch's measured-gene table.")
            masked_cells, masked_entries = self._mask(
                {
                    BATCH_KEYS.SEGMENT_PTR: segment_ptr,
                    BATCH_KEYS.MEASURED: measured,
                    BATCH_KEYS.MEASURED_ROW: measured_row,
                }
            )
            entry_positions = csr_rows(x_indptr) * self.n_input + x_indices
            values = x_data.masked_fill(masked_entries.view(-1).index_select(0, entry_positions), 0.0)
            scored_cells = masked_cells.nonzero().squeeze(1)
        h = self.embedder(x_indptr, x_indices, values)
        if self.positional_encoding is not None:
            token_scale = h.detach().square().mean(-1, keepdim=True).sqrt()
            h = h + self.positional_encoding(coords, has_coords, token_scale)
        h = self.projection(h)
        h = self.pre_latent_norm(self.encoder(h, segment_ptr))
        latent = self.latent(h, n_samples=n_samples)
        return {
            "z": latent.z,
            "qz": latent.qz,
            "latent": latent,
            "masked_cells": masked_cells,
            "scored_cells": scored_cells,
            "masked_entries": masked_entries,
        }

    # ------------------------------------------------------------- generative
    def _get_generative_input(
        self, tensors: dict[str, torch.Tensor], inference_outputs: dict, **kwargs
    ) -> dict:
        z, batch_index = inference_outputs["z"], tensors[BATCH_KEYS.BATCH]
        scored = inference_outputs["scored_cells"]
        if scored is not None:  # in training, only the cells the loss scores are decoded
            z, batch_index = z[..., scored, :], batch_index[scored]
        return {"z": z, "batch_index": batch_index}

    @auto_move_data
    def generative(
        self, z: torch.Tensor, batch_index: torch.Tensor, transform_batch: int | None = None
    ) -> dict:
        """Decode.

        Parameters
        ----------
        z
            ``(N, L)`` or ``(S, N, L)`` latent.
        batch_index
            ``(N,)`` batch codes.
        transform_batch
            Decode every cell as if it came from this batch code.

        Returns
        -------
        dict with ``px_logits``, the ``(..., N, G)`` gene logits.
        """
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        logits = self.decoder(z, batch_index)
        return {"px_logits": logits[..., self.gene_rows] if self.subset_genes else logits}

    def dispersion(self) -> torch.Tensor:
        """``(G,)`` negative-binomial inverse dispersion of the input genes, clamped to ``[1e-4, 1e4]``."""
        theta = self.log_dispersion[self.gene_rows] if self.subset_genes else self.log_dispersion
        return theta.exp().clamp(1e-4, 1e4)

    def normalized_expression(self, px_logits: torch.Tensor) -> torch.Tensor:
        """``(..., N, G)`` expression per unit library: the softmax of the logits (rows sum to 1)."""
        return F.softmax(px_logits, dim=-1)

    # ------------------------------------------------------------------- loss
    def _reconstruction(
        self,
        tensors: dict[str, torch.Tensor],
        px_logits: torch.Tensor,
        rows: torch.Tensor,
        measured: torch.Tensor,
        masked: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(S,)`` weighted NB negative log-likelihood of the cells ``rows`` (:func:`~cellplm_scvi.nn.nb_reconstruction`).

        Entry weights are ``masked + full_profile_weight * measured`` (``measured`` when ``masked``
        is ``None``); ``px_logits``, ``measured`` and ``masked`` are ``(S, G)``.
        """
        entries = stored_entries(tensors, rows)
        row, _, counts = entries  # the scored cells' library sizes from their own entries
        library = segment_sum(counts, row, rows.numel())[:, None]
        return nb_reconstruction(
            px_logits, library, self.dispersion(), measured, masked, self.full_profile_weight, entries
        )

    def loss(
        self,
        tensors: dict[str, torch.Tensor],
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        r"""Masked denoising ELBO.

        With ``M`` the masked cells, ``m_ij`` the masked entries (measured genes only, masked
        zeros included), ``G_i`` the measured genes of cell ``i`` and ``l_ij`` the per-entry loss
        (NB negative log-likelihood with mean ``l_i * rho_ij``, ``rho_i`` the decoder's softmax
        renormalised over ``G_i`` and ``l_i`` the observed library), the reconstruction term of cell ``i`` in training is

        .. math:: r_i = \sum_j m_{ij} l_{ij} + w \, [i \in M] \sum_{j \in G_i} l_{ij}

        with ``w = full_profile_weight``, and :math:`r_i = \sum_{j \in G_i} l_{ij}` for every cell
        in evaluation (no masking). The loss is ``sum_i r_i / n_scored + kl_weight * mean_i KL_i``,
        where ``n_scored`` is ``|M|`` in training and ``N`` in evaluation, and ``KL_i`` adds the
        latent layer's terms (``kl_z``, and ``kl_y`` for the mixture).
        """
        measured_table, measured_row = tensors[BATCH_KEYS.MEASURED], tensors[BATCH_KEYS.MEASURED_ROW]
        # a batch without any count: score every gene
        measured_table = measured_table | ~measured_table.any(-1, keepdim=True)
        n_cells = measured_row.numel()
        scored = inference_outputs["scored_cells"]
        px_logits = generative_outputs["px_logits"]  # of the scored cells only
        if scored is None:
            scored, masked = torch.arange(n_cells, device=measured_row.device), None
        else:  # only masked cells are decoded and scored; the others' loss is not computed at all
            masked = inference_outputs["masked_entries"][scored]
        measured = measured_table[measured_row[scored]]
        scored_loss = self._reconstruction(tensors, px_logits, scored, measured, masked)
        reconstruction = scored_loss.new_zeros(n_cells).index_put((scored,), scored_loss)
        n_scored = max(scored.numel(), 1)
        latent: LatentOutput = inference_outputs["latent"]
        kl = self.latent.kl(latent)
        kl_total = sum(kl.values()) if kl else torch.zeros_like(reconstruction)
        loss = reconstruction.sum() / n_scored + kl_weight * kl_total.mean()
        return LossOutput(
            loss=loss,
            reconstruction_loss=reconstruction,
            kl_local=kl or {"kl_z": torch.zeros_like(reconstruction)},
            n_obs_minibatch=reconstruction.numel(),
        )

    @torch.inference_mode()
    def sample(
        self, tensors: dict[str, torch.Tensor], n_samples: int = 1, generative_kwargs: dict | None = None
    ) -> torch.Tensor:
        """Posterior predictive counts, ``(N, G)`` or ``(N, G, S)`` on the CPU."""
        inference_outputs, generative_outputs = self.forward(
            tensors,
            inference_kwargs={"n_samples": n_samples},
            generative_kwargs=generative_kwargs,
            compute_loss=False,
        )
        library = library_sizes(tensors).to(self.device)
        mu = library * self.normalized_expression(generative_outputs["px_logits"])
        counts = NegativeBinomial(mu=mu, theta=self.dispersion()).sample()
        if n_samples > 1:
            counts = counts.permute(1, 2, 0)
        return counts.cpu()
