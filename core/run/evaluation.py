"""A held-out eval loss that moves only when the LoRA does.

Every ``eval_steps`` (and at the end) the flow-matching loss is computed on held-out images
(``eval_data_dir``, or ``eval_split`` images taken out of the training data with a fixed seed) at
``eval_sigma_levels`` evenly spaced noise levels, with noise fixed per image and level, in eval
mode (no LoRA dropout) and without gradients. The same model gives the same numbers every time, so
a falling eval loss is the LoRA learning, not the draw of sigmas. Logged per level and averaged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tuner.core.data.images import Item
from tuner.core.data.sampler import step_seed
from tuner.core.host import events
from tuner.core.training.sharding import is_sharded
from tuner.core.training.step import MicroBatch, Prediction, flow_matching_loss

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.data.cache import PreparedData
    from tuner.core.training.state import RunContext

EVAL_SEED = 0xE7A1


def split_off(items: list[Item], count: int, seed: int) -> tuple[list[Item], list[Item]]:
    """``count`` items held out for evaluation, chosen with a fixed seed: (training, held out)."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(step_seed(seed, EVAL_SEED)))
    held = set(order[:count].tolist())
    return [i for n, i in enumerate(items) if n not in held], [i for n, i in enumerate(items) if n in held]


class Evaluator:
    """Computes the eval loss of the trained model on the cached held-out entries."""

    def __init__(self, ctx: RunContext, prepared: PreparedData):
        self.ctx, self.prepared = ctx, prepared
        levels = ctx.config.eval_sigma_levels
        self.sigmas = [(i + 0.5) / levels for i in range(levels)]

    def run(self, model: torch.nn.Module, step: int) -> float | None:
        """The mean eval loss (main process only; None elsewhere), also sent as an Evaluation event.
        Under FSDP2 every process computes it (a sharded forward needs them all)."""
        ctx, config = self.ctx, self.ctx.config
        if not (ctx.is_main or is_sharded(model)):
            return None
        totals = [0.0] * len(self.sigmas)
        was_training = model.training
        model.eval()
        rng = torch.get_rng_state()
        predict = Prediction(ctx.host, config, model, ctx.weight_dtype, ctx.autocast)
        with torch.no_grad():
            for index, entry in enumerate(self.prepared.entries):
                latents = self.prepared.latents.load(entry.latent)["latents"][None].to(ctx.device)
                text = {k: v[None].to(ctx.device) for k, v in self.prepared.text.load(entry.text).items()}
                for level, sigma in enumerate(self.sigmas):
                    fixed = torch.Generator().manual_seed(step_seed(config.seed, EVAL_SEED, index, level))
                    noise = torch.randn(latents.shape, generator=fixed).to(ctx.device)
                    sigmas = torch.tensor([sigma], device=ctx.device)
                    loss = flow_matching_loss(predict, MicroBatch(latents, noise, sigmas, text, fixed))
                    totals[level] += float(loss)
        torch.set_rng_state(rng)
        model.train(was_training)
        if not ctx.is_main:
            return None
        losses = [total / len(self.prepared.entries) for total in totals]
        mean = sum(losses) / len(losses)
        ctx.log(f"eval loss {mean:.4f} at step {step} ({len(self.prepared.entries)} held-out images)")
        ctx.emit(events.Evaluation, step, eval_loss=mean, eval_sigmas=self.sigmas, eval_losses=losses)
        return mean
