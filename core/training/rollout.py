"""Scheduled sampling (rollout): some samples of a batch are trained on latents the model produced
itself, so it learns to correct the drift its own steps cause at inference (exposure bias).

For a sample chosen for rollout at training sigma ``t``: the clean latents are noised (with the
sample's own noise) to a higher sigma ``s``, ``k`` steps above ``t`` on the family's inference
schedule (:func:`~tuner.core.host.hookspecs.inference_sigmas`, ``validation_num_inference_steps`` long
unless ``scheduled_sampling_num_inference_steps`` says otherwise); the current model, without
gradients, takes Euler steps down that schedule, the last one landing exactly on ``t``; the
training step then runs at ``t`` on the result.

Three sigmas are one and the same: the noise level the rolled-out latents carry (the Euler chain
ends at ``t``), the sigma the model is conditioned on in the training forward, and the sigma of
the loss and of the log (``t``). (SimpleTuner 4.10 places its rollout on a linear ``t/999`` grid
whatever the family's remap, and logs ``1 - t/999``, the mirror of the latents' noise level.)

The target at ``t`` is the velocity that carries the rolled-out latents to the clean image,
``(x_t' - x_0) / t``. On the straight path it equals the plain target ``noise - x_0``; off it,
the plain target would teach the model to keep the drift its rollout made, while this one teaches
it to steer back to the image: the correction exposure-bias training is for. Samples not rolled
out keep the plain noisy latents and target bit for bit, so probability 0 trains exactly what a
run without rollout trains.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost
    from tuner.core.training.step import MicroBatch, Prediction


def enabled(config: Config) -> bool:
    return config.scheduled_sampling_max_step_offset > 0 and (
        config.scheduled_sampling_probability > 0
        or (
            config.scheduled_sampling_ramp_steps > 0
            and max(config.scheduled_sampling_prob_start, config.scheduled_sampling_prob_end) > 0
        )
    )


def probability(config: Config, step: int) -> float:
    """The share of samples rolled out at optimizer step ``step``: ``scheduled_sampling_probability``,
    or with ``scheduled_sampling_ramp_steps`` a ramp from ``prob_start`` to ``prob_end`` that begins at
    ``scheduled_sampling_start_step`` (linear or cosine)."""
    ramp = config.scheduled_sampling_ramp_steps
    if ramp <= 0:
        return config.scheduled_sampling_probability
    start, end = config.scheduled_sampling_prob_start, config.scheduled_sampling_prob_end
    progress = min(1.0, max(0.0, (step - config.scheduled_sampling_start_step) / ramp))
    if config.scheduled_sampling_ramp_shape == "cosine":
        progress = (1 - math.cos(math.pi * progress)) / 2
    return start + (end - start) * progress


def draw_offsets(config: Config, step: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Rollout steps per sample (0: not rolled out), drawn for the whole global batch from
    ``generator``: chosen with :func:`probability`, ``k`` in 1..max_step_offset by the strategy
    (uniform; biased_early favours short rollouts, biased_late long ones, weights 1/k and k)."""
    chosen = torch.rand(batch_size, generator=generator) < probability(config, step)
    most = config.scheduled_sampling_max_step_offset
    lengths = torch.arange(1, most + 1, dtype=torch.float64)
    weights = {"uniform": torch.ones_like(lengths), "biased_early": 1 / lengths, "biased_late": lengths}[
        config.scheduled_sampling_strategy
    ]
    offsets = torch.multinomial(weights, batch_size, replacement=True, generator=generator) + 1
    return torch.where(chosen, offsets, torch.zeros_like(offsets))


def chains(grid: torch.Tensor, sigmas: torch.Tensor, offsets: torch.Tensor) -> list[list[float]]:
    """Each sample's Euler chain, from ``s`` down to its ``t``: ``k`` grid points above ``t`` (fewer
    when ``t`` is within ``k`` steps of the top of the schedule), then ``t`` itself. ``grid`` is
    descending; a sample with offset 0 gets ``[t]`` (no step)."""
    found = []
    points = grid.double().tolist()
    for t, k in zip(sigmas.double().tolist(), offsets.tolist(), strict=True):
        above = [s for s in points if s > t]  # descending: the last ones are the nearest above t
        found.append([*above[len(above) - min(k, len(above)) :], t] if k else [t])
    return found


@torch.no_grad()
def roll_out(
    model: Prediction, batch: MicroBatch, paths: list[list[float]], forwards: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy latents at the batch's sigmas and the training target, with the samples whose
    ``paths`` (:func:`chains`) climb above their sigma produced by the model's own Euler steps down
    them (see the module's docstring). ``forwards``: run exactly this many forwards (at least the
    longest path's steps), as every process of a sharded model must; a forward with no sample of
    this process to step computes one row and drops it."""
    from tuner.core.model import flow

    latents, noise, sigmas, text = batch.latents, batch.noise, batch.sigmas, batch.text
    transformer = model.transformer
    noisy, target = flow.noisy_and_target(latents, noise, sigmas)
    steps = [len(path) - 1 for path in paths]
    longest = max(max(steps, default=0), forwards or 0)
    if longest == 0:
        return noisy, target
    rolled = torch.tensor([n > 0 for n in steps], device=latents.device)
    starts = torch.tensor([path[0] for path in paths], dtype=torch.float32)
    current, _ = flow.noisy_and_target(latents, noise, starts.to(latents.device))
    was_training = transformer.training
    transformer.eval()  # no LoRA dropout in the model's own steps
    try:
        for index in range(longest):  # chains aligned to end together: all land on t at the last step
            active = [i for i, n in enumerate(steps) if index >= longest - n and n > 0]
            if not active:  # only another process steps now: take part in the sharded forward
                model(
                    current[:1], sigmas[:1].float(), {name: value[:1] for name, value in text.items()}, batch.generator
                )
                continue
            here = torch.tensor([paths[i][index - (longest - steps[i])] for i in active], dtype=torch.float32)
            there = torch.tensor([paths[i][index - (longest - steps[i]) + 1] for i in active], dtype=torch.float32)
            rows = torch.tensor(active, device=latents.device)
            velocity = model(
                current[rows],
                here.to(latents.device),
                {name: value[rows] for name, value in text.items()},
                batch.generator,
            )
            step = (there - here).to(latents.device).view(-1, *([1] * (latents.dim() - 1)))
            current[rows] = current[rows] + step * velocity.float()
    finally:
        transformer.train(was_training)
    t = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    mask = rolled.view(-1, *([1] * (latents.dim() - 1)))
    return torch.where(mask, current, noisy), torch.where(mask, (current - latents) / t, target)


def inference_grid(host: PluginHost, config: Config, scheduler: Any, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The family's inference sigmas for the rollout, descending, ending at 0."""
    steps = config.scheduled_sampling_num_inference_steps or config.validation_num_inference_steps
    grid = host.provide(
        "inference_sigmas", config=config, scheduler=scheduler, num_steps=steps, latent_shape=tuple(latent_shape)
    )
    return torch.as_tensor(grid, dtype=torch.float64).flatten()
