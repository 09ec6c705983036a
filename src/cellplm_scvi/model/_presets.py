"""Named architecture presets."""

from __future__ import annotations

#: Module sizes of the published CellPLM checkpoints (the "85M" models): D=1024, 4 flow layers,
#: 8 heads, latent 512, 16 components, decoder 1024, dropout 0.2.
PRESETS: dict[str, dict] = {
    "cellplm-85m": {
        "n_hidden": 1024,
        "n_layers": 4,
        "n_heads": 8,
        "n_latent": 512,
        "n_components": 16,
        "n_decoder_hidden": 1024,
        "dropout": 0.2,
        "attention": "flow",
    },
}


def resolve_preset(preset: str | None, overrides: dict) -> dict:
    """Module keyword arguments of ``preset`` updated with ``overrides``."""
    if preset is None:
        return dict(overrides)
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)} or None.")
    return {**PRESETS[preset], **overrides}
