"""One optimizer step as a run takes it: ``gradient_accumulation_steps`` micro-batches, each with its
sigmas, noise, caption dropout and scheduled-sampling rollouts drawn for the whole global batch
(this process takes its slice), the family's prediction, the loss and backward; then clipping and
the optimizer step. The Trainer calls it for every step; ``tuner estimate`` traces the same code.

Every draw is seeded from (seed, micro-step, rollbacks, purpose, rank) with
:func:`~tuner.core.data.sampler.step_seed`, never from what ran before, so a resumed run continues
exactly and N processes train what one process with N times the batch trains.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tuner.core.data.cache import CachedDataset, collate
from tuner.core.data.sampler import DatasetBatches, step_seed
from tuner.core.training import rollout
from tuner.core.training.sharding import gradient_sync, is_sharded, whole
from tuner.core.training.step import MicroBatch, Prediction, flow_matching_loss

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.training.state import Position, RunContext, TrainState


@dataclass
class StepOutcome:
    loss: float
    sigmas: list[float]
    grad_norm: float
    sizes: list[list[int]]  # [height, width] in pixels of each micro-batch
    datasets: list[str]  # the dataset of each micro-batch


class Stepper:
    """Draws batches and takes optimizer steps for one run.

    ``datasets`` are the run's datasets (:class:`tuner.core.config.datasets.Dataset`; their weights
    order the batches, their caption dropout applies per batch), ``dropped_captions`` per dataset
    the cached encoding a dropped caption trains with ("", or its caption_prefix when asked)."""

    def __init__(self, ctx: RunContext, datasets: list[Any], dropped_captions: list[dict[str, torch.Tensor]]):
        self.ctx, self.datasets, self.dropped_captions = ctx, datasets, dropped_captions
        self.grids: dict[tuple[int, ...], torch.Tensor] = {}  # scheduled sampling: inference sigmas per size
        self.scheduler: Any = None  # the family's inference scheduler, loaded for the first rollout

    def batches(self, dataset: CachedDataset, position: Position):
        """Endless batches for this process from ``position`` on (pinned on CUDA: copies do not block)."""
        ctx, config = self.ctx, self.ctx.config
        sampler = DatasetBatches(
            [e.dataset for e in dataset.prepared.entries],
            dataset.buckets(),
            [d.weight for d in self.datasets] if self.datasets else [1.0],
            config.train_batch_size,
            ctx.accelerator.num_processes,
            ctx.accelerator.process_index,
            config.seed,
            position.micro_step,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=config.dataloader_num_workers,
            pin_memory=ctx.device.type == "cuda",
        )
        return iter(loader)

    def optimizer_step(self, state: TrainState, batches) -> StepOutcome | None:
        """The micro-batches of one step, then the optimizer step; None when anything was non-finite
        (the gradients are then dropped)."""
        config, accelerator = self.ctx.config, self.ctx.accelerator
        accumulation = config.gradient_accumulation_steps
        losses, sigmas, sizes, used = [], [], [], []
        for index in range(accumulation):
            batch = next(batches)
            sizes.append(list(batch["size"]))
            used.append(self.datasets[batch["dataset"]].id if self.datasets else "default")
            syncing = index == accumulation - 1
            with gradient_sync(state.wrapped, accelerator, syncing):
                loss, drawn = self.training_loss(state, batch, state.position.micro_step)
                accelerator.backward(loss / accumulation)
            state.position.micro_step += 1
            losses.append(loss.detach().float())
            sigmas.append(drawn)
        step_loss = torch.stack(losses).mean()
        if accelerator.num_processes > 1:
            step_loss = accelerator.reduce(step_loss.to(accelerator.device), reduction="mean")
        limit = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
        grad_norm = whole(accelerator.clip_grad_norm_(state.params, limit))  # sharded: the global norm
        if not self.finite(step_loss, grad_norm):
            state.optimizer.zero_grad(set_to_none=True)
            return None
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        return self.outcome(step_loss, sigmas, grad_norm, sizes, used)

    def training_loss(
        self, state: TrainState, batch: dict[str, Any], micro_step: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's loss and the sigmas it was drawn at."""
        ctx, config, accelerator = self.ctx, self.ctx.config, self.ctx.accelerator
        rollbacks, rank, device = state.guard.rollbacks, accelerator.process_index, ctx.device
        latents = batch["latents"].to(device, torch.float32, non_blocking=True)
        local = latents.shape[0]
        global_shape = (local * accelerator.num_processes, *latents.shape[1:])
        shared = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x5EED))
        mine = slice(rank * local, (rank + 1) * local)
        with self.exact():
            every_sigma = ctx.host.provide(
                "sample_sigmas", config=config, batch_size=global_shape[0], latent_shape=global_shape, generator=shared
            )
            sigmas = every_sigma[mine]
        noise = torch.randn(global_shape, generator=shared)[mine].to(device)
        text = self.caption_dropout(batch, global_shape[0], shared, mine)
        text = {k: v.to(device, non_blocking=True) for k, v in text.items()}
        model = Prediction(ctx.host, config, state.wrapped, ctx.weight_dtype, accelerator.autocast)
        rolled, paths, forwards = None, None, None
        if rollout.enabled(config):  # drawn for the global batch, like the noise
            with self.exact():
                every_offset = rollout.draw_offsets(config, state.position.step, global_shape[0], shared)
                offsets = every_offset[mine]
                if bool(every_offset.any() if is_sharded(state.model) else offsets.any()):
                    grid = self.inference_grid(global_shape)
                    paths = rollout.chains(grid, sigmas, offsets)
                    if is_sharded(state.model):  # a sharded forward needs every process: all take the most steps
                        forwards = max(len(path) - 1 for path in rollout.chains(grid, every_sigma, every_offset))
        if paths is not None:
            steps = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x2011, rank))
            own_model = Prediction(ctx.host, config, state.model, ctx.weight_dtype, accelerator.autocast)
            micro = MicroBatch(latents, noise, sigmas.to(device), text, steps)
            rolled = rollout.roll_out(own_model, micro, paths, forwards)
        own = torch.Generator().manual_seed(step_seed(config.seed, micro_step, rollbacks, 0x10CA1, rank))
        torch.manual_seed(step_seed(config.seed, micro_step, rollbacks, 0xD409, rank))  # LoRA dropout
        base = None
        if self.datasets and self.datasets[batch["dataset"]].config.regularisation_target == "base_model":
            base = Prediction(ctx.host, config, state.model, ctx.weight_dtype, accelerator.autocast)
        mask = batch.get("mask")
        micro = MicroBatch(latents, noise, sigmas.to(device), text, own)
        if mask is not None:
            own_config = self.datasets[batch["dataset"]].config if self.datasets else config
            micro.mask, micro.mask_floor = mask.to(device, torch.float32), own_config.masked_loss_floor
        loss = flow_matching_loss(model, micro, rolled, base)
        return loss, sigmas

    def caption_dropout(
        self, batch: dict[str, Any], global_size: int, shared: torch.Generator, mine: slice
    ) -> dict[str, torch.Tensor]:
        """The batch's text with dropped captions replaced (drawn for the global batch)."""
        text = batch["text"]
        dropout = self.datasets[batch["dataset"]].config.caption_dropout_probability if self.datasets else 0.0
        if dropout <= 0:
            return text
        with self.exact():
            dropped = (torch.rand(global_size, generator=shared) < dropout)[mine]
        instead = batch.get("dropped_text") or self.dropped_captions[batch["dataset"]]  # edit pairs: each its own
        return {
            name: _replace_rows(dropped, value, instead[name]) if name in instead else value  # reference latents stay
            for name, value in text.items()
        }

    # -- what a step decides from values: ``tuner estimate`` runs this class's steps on fake
    # tensors, which have shapes but no values, through a subclass that answers these three
    # (tuner.core.estimate.trace.TracingStepper); everything else is the same code

    def exact(self) -> Any:
        """The context of the step's small draws (sigmas, caption dropout, rollout offsets: a few
        numbers per sample) that decide what the step does; in training, just the step's context."""
        return nullcontext()

    def finite(self, loss: torch.Tensor, grad_norm: Any) -> bool:
        return bool(torch.isfinite(loss) and torch.isfinite(torch.as_tensor(grad_norm)))

    def outcome(
        self, loss: torch.Tensor, sigmas: list[torch.Tensor], grad_norm: Any, sizes: list, used: list
    ) -> StepOutcome:
        return StepOutcome(float(loss), torch.cat(sigmas).tolist(), float(grad_norm), sizes, used)

    def inference_grid(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The family's inference sigmas at this bucket's size, for scheduled sampling (kept per size)."""
        key = tuple(latent_shape[1:])
        if key not in self.grids:
            ctx = self.ctx
            if self.scheduler is None:
                self.scheduler = ctx.host.provide(
                    "load_model", config=ctx.config, component="scheduler", dtype=ctx.weight_dtype
                )
            self.grids[key] = rollout.inference_grid(ctx.host, ctx.config, self.scheduler, latent_shape)
        return self.grids[key]


def _replace_rows(rows: torch.Tensor, batch: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """``batch`` with the rows picked by ``rows`` replaced by ``row`` (one row for every sample, or a
    batch of them: edit pairs' own); text of varying length (``FamilyInfo.text_lengths_vary``) is
    zero-padded to the longer of the two first."""
    own = row.dim() == batch.dim()
    tokens = 1 if own else 0  # the token axis of ``row``
    if row.dim() > tokens and row.shape[tokens] != batch.shape[1]:
        longest = max(row.shape[tokens], batch.shape[1])
        row = _pad_tokens(row, tokens, longest)
        batch = _pad_tokens(batch, 1, longest)
    return torch.where(_rows(rows, batch), row, batch)


def _pad_tokens(tensor: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    shape = list(tensor.shape)
    shape[axis] = length - shape[axis]
    return torch.cat([tensor, tensor.new_zeros(shape)], axis)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample boolean mask shaped to broadcast over ``like``'s trailing dimensions."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))
