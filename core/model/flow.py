"""Flow-matching arithmetic shared by every family: noise levels, noisy inputs, targets, loss.

noisy = (1 - sigma) * x0 + sigma * noise,  target = noise - x0,  loss = mean MSE (fp32)
"""

from __future__ import annotations

import math
from typing import Any

import torch


def logit_normal(batch_size: int, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """sigma = sigmoid(N(0, 1) * scale): the Flux/SD3 default density on (0, 1)."""
    return torch.sigmoid(torch.randn(batch_size, generator=generator) * scale)


def base_sigmas(config: Any, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The draw a family shifts or remaps (``sigma_sampling``): ``family`` is the logit-normal with
    ``flow_sigmoid_scale`` every family drew before the key existed (the same numbers from the same
    generator); ``uniform``; ``logit_normal`` sigmoid(N(mean, std)); ``mode`` SD3's
    1 - u - s (cos^2(pi u / 2) - 1 + u); ``inverted_parabola`` density 6 s (1 - s), by its inverse CDF."""
    kind = config.sigma_sampling
    if kind == "family":
        return logit_normal(batch_size, generator, config.flow_sigmoid_scale)
    if kind == "logit_normal":
        normal = torch.randn(batch_size, generator=generator)
        return torch.sigmoid(config.sigma_sampling_mean + config.sigma_sampling_std * normal)
    u = torch.rand(batch_size, generator=generator)
    if kind == "mode":
        return 1 - u - config.sigma_sampling_scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    if kind == "inverted_parabola":  # F(s) = 3 s^2 - 2 s^3 = u, solved in closed form
        return 0.5 + torch.cos(torch.arccos(1 - 2 * u) / 3 - 2 * math.pi / 3)
    return u


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift s*sigma / (1 + (s-1)*sigma); shift > 1 moves mass towards noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """exp(mu) with mu linear in the packed image sequence length (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = image_seq_len * slope + (base_shift - slope * base_seq_len)
    return math.exp(mu)


def pack_patches(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches in row-major order, feature index
    c*4 + dy*2 + dx (the Flux lineage's and Qwen-Image's _pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_patches(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_patches` for a latent of height ``h`` and width ``w``."""
    b, _, features = packed.shape
    c = features // 4
    x = packed.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def packed_tokens(latent_shape: tuple[int, ...]) -> int:
    """Image tokens of a latent of ``latent_shape`` in 2x2 patches (the Flux lineage, SD3, Qwen-Image)."""
    return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)


def dynamic_shift_mu(image_seq_len: int, constants: Any) -> float:
    """mu of a flow-matching scheduler with ``use_dynamic_shifting``: linear in the image sequence
    length between its config's (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``,
    ``max_shift``), as diffusers' pipelines compute it; diffusers' defaults where the config has none."""
    get = constants.get if hasattr(constants, "get") else lambda name, default: getattr(constants, name, default)
    return math.log(
        resolution_shift(
            image_seq_len,
            get("base_image_seq_len", 256),
            get("max_image_seq_len", 4096),
            get("base_shift", 0.5),
            get("max_shift", 1.15),
        )
    )


def sample_shifted_logit_normal(
    config,
    batch_size: int,
    latent_shape: tuple[int, ...],
    generator: torch.Generator,
    shift_constants: dict | None = None,
) -> torch.Tensor:
    """Sigmas from :func:`base_sigmas` (``sigma_sampling``) with the static (``flow_schedule_shift``) or
    resolution-dependent (``flow_schedule_auto_shift``) shift. ``shift_constants`` are a scheduler
    config's ``base_image_seq_len``/``max_image_seq_len``/``base_shift``/``max_shift`` (diffusers'
    defaults when absent). The sequence length is that of 2x2-packed latents."""
    sigmas = base_sigmas(config, batch_size, generator)
    if config.flow_schedule_auto_shift:
        shift = math.exp(dynamic_shift_mu(packed_tokens(latent_shape), shift_constants or {}))
        sigmas = shift_sigmas(sigmas, shift)
    elif config.flow_schedule_shift is not None:
        sigmas = shift_sigmas(sigmas, config.flow_schedule_shift)
    return clamp_open_unit(sigmas)


def clamp_open_unit(sigmas: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Keep sigma strictly inside (0, 1) so neither the clean nor the pure-noise end is degenerate."""
    return sigmas.clamp(eps, 1 - eps)


def noisy_and_target(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise, noise - latents


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE in fp32, mean per sample then over the batch."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    return per_sample.mean()


def masked_flow_loss(
    prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, floor: float = 0.0
) -> torch.Tensor:
    """The squared error of each latent pixel (mean over channels), weighted by its mask ``weights``
    (``[B, 1, h, w]``, at least ``floor``): sum(w * l) / sum(w) per sample, in fp32, then the mean
    over the batch. A sample whose weights are all 0 (a crop of only black) contributes 0."""
    per_pixel = (prediction.float() - target.float()).pow(2).mean(1)
    w = weights.float().clamp(min=floor)[:, 0]
    per_sample = (per_pixel * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1e-8)
    return per_sample.mean()


def histogram(samples: torch.Tensor, bins: int = 20) -> tuple[list[float], list[int]]:
    """Counts of samples in ``bins`` equal bins over [0, 1]: (edges, counts)."""
    counts = torch.histc(samples.float(), bins=bins, min=0.0, max=1.0)
    edges = torch.linspace(0, 1, bins + 1)
    return [round(float(e), 6) for e in edges], [int(c) for c in counts]
