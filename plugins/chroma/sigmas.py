"""Chroma's sigma density: logit-normal with a quadratic remap that visits both tails more often."""

from __future__ import annotations

import torch

from tuner.core.api import flow

SIMPLETUNER_SHIFT = 3.0


def sample(config, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Draw sigmas (``sigma_sampling``'s density), then remap (``chroma_sigma_remap``): sigma ->
    sigma^2 or 1 - (1 - sigma)^2.

    ``random`` chooses the branch per sample with probability 1/2: a U-shaped density over the
    whole of (0, 1). ``threshold`` reproduces SimpleTuner (shift 3, then sigma^2 below 0.5 and
    1-(1-sigma)^2 above), which leaves [0.25, 0.75) untrained; it exists for comparison only.
    """
    remap = config.chroma_sigma_remap
    sigmas = flow.base_sigmas(config, batch_size, generator)
    if remap == "threshold":
        sigmas = flow.shift_sigmas(sigmas, SIMPLETUNER_SHIFT)
        low = sigmas < 0.5
    else:
        low = torch.rand(batch_size, generator=generator) < 0.5
    remapped = torch.where(low, sigmas.square(), 1 - (1 - sigmas).square())
    return flow.clamp_open_unit(remapped)
