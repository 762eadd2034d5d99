"""The miniature Flux-lineage transformer config shared by the Chroma and Flux miniatures."""

from __future__ import annotations

from tuner.testing.tiny import TEXT_WIDTH


def transformer_config(**overrides) -> dict:
    """The miniature transformer shared by Chroma and Flux (1 double, 2 single blocks, width 32)."""
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": TEXT_WIDTH,
        "axes_dims_rope": (4, 6, 6),
        **overrides,
    }
