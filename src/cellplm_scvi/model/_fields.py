"""Registry fields of CellPLM beyond scvi-tools' own."""

from __future__ import annotations

from anndata import AnnData
from scvi.data import fields

from ._validation import check_spatial


class CoordinatesField(fields.ObsmField):
    """Cell coordinates in ``obsm``, as an ``(n_obs, 2+)`` array or a DataFrame.

    The columns are read by position (x, then y), so data set up with coordinates in one form
    is accepted with them in the other, and DataFrame column names need not match.
    """

    def transfer_field(self, state_registry: dict, adata_target: AnnData, **kwargs) -> dict:
        """Register the coordinates of ``adata_target``, checking them as :meth:`CellPLM.setup_anndata` does."""
        check_spatial(adata_target, self.attr_key)
        source_columns = state_registry[self.COLUMN_NAMES_KEY]
        n_columns = self.get_field_data(adata_target).shape[1]
        if n_columns != len(source_columns):
            raise ValueError(
                f"adata.obsm[{self.attr_key!r}] has {n_columns} columns, but the model was set up with "
                f"{len(source_columns)}."
            )
        return {self.COLUMN_NAMES_KEY: list(source_columns)}


MuDataCoordinatesField = fields.MuDataWrapper(CoordinatesField)
