"""A run's checkpoints: saving the training state, resuming from it, and rolling back to it when
training diverges. The files themselves (atomic writes, manifests, no pickle) are
:mod:`tuner.core.outputs.checkpoint`'s business; this module maps a :class:`TrainState` onto them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuner.core import __version__
from tuner.core.host import events
from tuner.core.outputs import checkpoint, sharded
from tuner.core.outputs.export import lora_files
from tuner.core.training.ema import EMA_FILE
from tuner.core.training.runtime import scale_learning_rate
from tuner.core.training.sharding import gathered, is_dtensor, is_sharded, place_like, whole
from tuner.core.training.state import Position

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.training.state import RunContext, TrainState


@dataclass
class Snapshot:
    """The state a rollback returns to before any checkpoint exists, in host memory (it must not
    take accelerator memory all run long)."""

    adapter: dict[str, torch.Tensor] | None  # None for a full fine-tune: the base model's files hold it
    optimizer: tuple[dict[str, torch.Tensor], dict[str, Any]]
    lr_scheduler: dict[str, Any]
    guard: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


class Checkpoints:
    """Save, find, restore and roll back the checkpoints of one run's ``output_dir``."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.start: Snapshot | None = None

    def remember_start(self, state: TrainState) -> None:
        """Keep the freshly initialised state as the rollback target until a checkpoint exists."""
        if self.ctx.is_main:
            checkpoint.prune(self.ctx.output_dir, 0)  # leftovers of saves cut off by a crash
        full = self.ctx.config.get("model_type", "lora") == "full"  # a copy of the whole model: read again instead

        def host_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # sharded: gathered (small)
            return {n: whole(t).to("cpu", copy=True) for n, t in tensors.items()}

        self.start = Snapshot(
            adapter=None if full else host_copy(state.adapter()),
            optimizer=checkpoint.optimizer_state(state.optimizer),
            lr_scheduler=state.lr_scheduler.state_dict(),
            guard=state.guard.state_dict(),
            ema=host_copy(state.ema.state_dict()) if state.ema else None,
        )

    def save(self, state: TrainState) -> Path:
        """Write ``checkpoint-<step>`` (every process calls it; under FSDP2 every process writes
        its shards, :mod:`tuner.core.outputs.sharded`)."""
        ctx, position = self.ctx, state.position
        folder = ctx.output_dir / f"checkpoint-{position.step}"
        ctx.accelerator.wait_for_everyone()
        shards = is_sharded(state.model)
        files: dict[str, Any] = {}
        record: dict[str, Any] = {}
        with gathered(state.model, trainable_only=True, keep=ctx.is_main):  # the LoRA files: whole tensors
            if ctx.is_main:  # what the main process writes (under FSDP2 every process writes its shards too)
                files, record = self.contents(state, shards)
        if shards:
            sharded.write(ctx, folder, state, files, record, lambda: self.last_good(folder))
        elif ctx.is_main:
            checkpoint.write_checkpoint(folder, files, record, lambda: self.last_good(folder))
        if ctx.is_main:
            checkpoint.prune(ctx.output_dir, ctx.config.checkpoints_total_limit or 0)
            ctx.emit(events.Save, position.step, files=[str(folder / name) for name in files], checkpoint=str(folder))
            ctx.log(f"step {position.step}: checkpoint saved to {folder}")
        ctx.accelerator.wait_for_everyone()
        return folder

    def contents(self, state: TrainState, shards: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """The checkpoint's safetensors files and ``state.json`` record, as the main process writes
        them (sharded: without the tensors DCP writes)."""
        ctx, position = self.ctx, state.position
        files = {
            name: content
            for per_format in lora_files(ctx, state.model, state.targets, position.step).values()
            for name, content in per_format.items()
        }
        opt_tensors, opt_state = checkpoint.optimizer_state(state.optimizer)
        rng_tensors, rng_scalars = checkpoint.rng_state()
        files["rng.safetensors"] = (rng_tensors, None)
        if not shards:
            files["adapter.safetensors"] = (state.adapter(), None)
            files["optimizer.safetensors"] = (opt_tensors, None)
            if state.ema is not None:
                files[EMA_FILE] = (state.ema.state_dict(), None)
        record = {
            "tuner_version": __version__,
            "position": vars(position),
            "samples_per_micro_step": ctx.config.train_batch_size * ctx.accelerator.num_processes,
            "processes": ctx.accelerator.num_processes,
            "guard": state.guard.state_dict(),
            "optimizer": opt_state,
            "scheduler": state.lr_scheduler.state_dict(),
            "rng": rng_scalars,
            "resume_settings": checkpoint.resume_settings(ctx.config, state.targets),
            "config": ctx.config.to_dict(),
        }
        return files, record

    def last_good(self, writing: Path | None = None) -> str:
        """The newest intact checkpoint's name (other than the one being written), for messages."""
        good = [
            p for _, p in checkpoint.checkpoints(self.ctx.output_dir) if p != writing and checkpoint.verify(p) is None
        ]
        return good[-1].name if good else "no earlier checkpoint"

    def restore(self, state: TrainState, folder: Path) -> None:
        saved, tensors = checkpoint.read_checkpoint(folder)
        checkpoint.check_resume_settings(saved["resume_settings"], self.ctx.config, state.targets, folder)
        position = dict(saved["position"])
        # checkpoints of tuner 0.1 kept the guard's counters in the position
        guard = saved.get("guard") or {
            "rollbacks": position.pop("rollbacks", 0),
            "lr_scale": position.pop("lr_scale", 1.0),
        }
        self.check_batch(saved, folder)
        if sharded.is_sharded_checkpoint(folder):  # written under FSDP2: read into this run's layout
            adapter, optimizer, ema = sharded.read(folder, state)
        else:
            adapter, optimizer = tensors["adapter"], tensors["optimizer"]
            ema = tensors.get(EMA_FILE.removesuffix(".safetensors"), {})
        _load(state, adapter, (optimizer, saved["optimizer"]), saved["scheduler"])
        _load_ema(state, ema)
        state.position = Position(step=position["step"], micro_step=position["micro_step"])
        state.guard.load_state_dict(guard)
        checkpoint.restore_rng(tensors["rng"], saved["rng"])

    def latest_valid(self) -> Path | None:
        """The newest intact checkpoint, as the main process finds it: every process resumes the
        same one even while files change (a process of a killed run still writing)."""
        ctx = self.ctx
        found = [checkpoint.latest_valid(ctx.output_dir, ctx.warn) if ctx.is_main else None]
        if ctx.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            found = broadcast_object_list(found)
        return found[0]

    def check_batch(self, saved: dict[str, Any], folder: Path) -> None:
        """The data order continues from samples consumed = micro-steps x samples per micro-step:
        another global batch continues elsewhere (said, not refused: a deliberate change is allowed)."""
        ctx = self.ctx
        before = saved.get("samples_per_micro_step")
        now = ctx.config.train_batch_size * ctx.accelerator.num_processes
        if before is not None and before != now and ctx.is_main:
            ctx.warn(
                f"resume_from_checkpoint: {folder.name} drew {before} samples per micro-step "
                f"({_processes(saved.get('processes'))}); this run draws {now} "
                f"({ctx.accelerator.num_processes} x train_batch_size {ctx.config.train_batch_size}): the samples from "
                "here on differ from an uninterrupted run; set train_batch_size so the two match"
            )

    def base_weights(self, state: TrainState) -> dict[str, torch.Tensor]:
        """The denoiser's weights as loaded at the start (a full fine-tune's rollback target before
        its first checkpoint), read from the model's files again."""
        from tuner.core.training.runtime import trained_dtype

        ctx = self.ctx
        base = ctx.host.provide(
            "load_model", config=ctx.config, component="transformer", dtype=trained_dtype(ctx.config)
        )
        trained = state.adapter()
        return {name: value for name, value in base.named_parameters() if name in trained}

    def resume(self, state: TrainState) -> Path | None:
        """Restore ``resume_from_checkpoint`` (``latest``: the newest intact one) into ``state``."""
        config, wanted = self.ctx.config, self.ctx.config.resume_from_checkpoint
        if not wanted:
            return None
        if wanted == "latest":
            folder = self.latest_valid()
            if folder is None:
                self.ctx.warn(
                    f"resume_from_checkpoint: latest: no checkpoint in {self.ctx.output_dir}; starting at step 0"
                )
                return None
        else:
            folder = Path(wanted)
            if not folder.is_dir():
                raise config.error("resume_from_checkpoint", f"{folder} is not a checkpoint folder")
        self.restore(state, folder)
        if state.position.step >= config.max_train_steps:  # `tuner run` says so before loading anything
            raise config.error(
                "max_train_steps",
                f"{folder.name} is at step {state.position.step} and max_train_steps is {config.max_train_steps}: "
                f"nothing to train; raise max_train_steps above {state.position.step} to train on",
            )
        self.ctx.log(f"resumed from {folder} at step {state.position.step}")
        said = schedule_change(state.lr_scheduler, state.position.step, config)
        if said:
            self.ctx.log(said)
        return folder

    def roll_back(self, state: TrainState) -> None:
        """Return to the newest intact checkpoint (or the start) with the learning rate scaled down;
        the guard raises :class:`~tuner.core.errors.Diverged` when its rollbacks are used up."""
        guard = state.guard
        lr_scale = guard.begin_rollback(state.position.step + 1)
        rollbacks = guard.rollbacks
        folder = self.latest_valid()
        if folder is not None:
            self.restore(state, folder)
        else:
            start = self.start
            weights = start.adapter if start.adapter is not None else self.base_weights(state)
            _load(state, weights, start.optimizer, start.lr_scheduler)
            _load_ema(state, start.ema)
            state.position = Position()
            state.guard.load_state_dict(start.guard)
        # the restored optimizer and schedule run at the scale they were saved with
        scale_learning_rate(state.optimizer, state.lr_scheduler, lr_scale / guard.lr_scale)
        guard.load_state_dict({"rollbacks": rollbacks, "lr_scale": lr_scale})
        target = folder.name if folder is not None else "the start"
        self.ctx.log(f"rolled back to {target} (step {state.position.step}); learning rate x{lr_scale:g}")
        self.ctx.emit(events.Rollback, state.position.step, to=target, lr_scale=lr_scale, rollbacks=rollbacks)


def schedule_change(lr_scheduler: Any, step: int, config: Any) -> str | None:
    """What a resume with another ``max_train_steps`` does to the learning rate, in one line, or None.

    The schedule is a function of the total (the checkpoint keeps where it was, not the function),
    so extending a finished cosine run raises the rate from about 0 back up and decays it again
    over the new total: said, since a loss that moves again after "finished" is otherwise a puzzle."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    saved = (getattr(lr_scheduler, "_last_lr", None) or [None])[0]
    if not lambdas or saved is None:
        return None
    upcoming = lr_scheduler.base_lrs[0] * lambdas[0](step)
    if math.isclose(upcoming, saved, rel_tol=0.01, abs_tol=1e-12):
        return None
    then = {"constant": "", "constant_with_warmup": ""}.get(
        config.lr_scheduler, f", then follows {config.lr_scheduler}"
    )
    return (
        f"max_train_steps {config.max_train_steps}: the {config.lr_scheduler} schedule is recomputed over the new "
        f"total, so the learning rate goes from {saved:.3g} (where the checkpoint left it) to {upcoming:.3g} at "
        f"step {step}{then} to step {config.max_train_steps}"
    )


def _load(state: TrainState, adapter, optimizer_state, scheduler_state) -> None:
    """Weights, optimizer and schedule into ``state``; whole tensors are cut to this process's
    shards under FSDP2 (a checkpoint of an unsharded run, the start of the run)."""
    parameters = dict(state.model.named_parameters())
    with torch.no_grad():
        for name, value in adapter.items():
            target = parameters[name]
            value = value if is_dtensor(value) else place_like(value.to(_local(target).device), target)
            target.copy_(value)
    tensors, scalars = optimizer_state
    by_index = [p for group in state.optimizer.param_groups for p in group["params"]]

    def laid_out(key: str, value: torch.Tensor) -> torch.Tensor:  # a parameter's whole state: its shards
        param = by_index[int(key.split(".")[0])]
        return place_like(value, param) if not is_dtensor(value) and value.shape == param.shape else value

    tensors = {key: laid_out(key, value) for key, value in tensors.items()}
    checkpoint.restore_optimizer(state.optimizer, tensors, scalars)
    state.lr_scheduler.load_state_dict(scheduler_state)


def _load_ema(state: TrainState, tensors: dict[str, torch.Tensor] | None) -> None:
    if state.ema is None:
        return
    average = state.ema.state_dict()
    state.ema.load_state_dict({n: place_like(v, average[n]) if n in average else v for n, v in (tensors or {}).items()})


def _processes(count: int | None) -> str:
    return "processes unknown" if count is None else f"{count} process{'' if count == 1 else 'es'}"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor
