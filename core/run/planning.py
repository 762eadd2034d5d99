"""``memory_budget``: before anything loads, the fastest memory plan that fits the budget sets the
plan's keys the user left unset (``tuner estimate --plan`` shows every plan and the chosen one)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from tuner.core.config.keys.model import parse_budget
from tuner.core.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.training.state import RunContext


def apply_memory_budget(ctx: RunContext) -> None:
    """Choose and apply the plan (every process the same one: an ``auto`` budget is the smallest
    free memory of them)."""
    config = ctx.config
    if not config.memory_budget:
        return
    device_type = ctx.device.type
    if device_type == "cpu":
        ctx.warn("memory_budget: on a CPU the weights stay in RAM whatever the plan; nothing is changed")
        return
    from tuner.core.data.cache import default_cache_dir
    from tuner.core.estimate import available_ram, free_memory, size
    from tuner.core.estimate.cached import cached_plans, remember_estimate
    from tuner.core.estimate.plan import choose, kept_in_place, none_fits, plan_keys, validation_swap

    budget = free_memory(device_type) if config.memory_budget == "auto" else parse_budget(config.memory_budget)
    if budget is None:
        raise config.error("memory_budget", f"auto: the free memory of {device_type} cannot be read; give a size")
    budget = _smallest_over_processes(ctx, budget)
    folder = config.cache_dir or default_cache_dir()
    plans = cached_plans(ctx.host, config, device_type, folder)
    ram = available_ram()
    chosen = choose(plans, budget, ram)
    if chosen is None:
        raise ConfigError(f"{config.source}: memory_budget: {size(budget)}: {none_fits(plans, budget, ram)}")
    for key, value in chosen.settings.items():
        config.set_resolved(key, value)
    said = plan_keys(chosen.settings)
    if not config.is_set("validation_blocks_to_swap") and chosen.settings["blocks_to_swap"]:
        fewer = validation_swap(chosen, budget)  # validation keeps the other blocks in place
        config.set_resolved("validation_blocks_to_swap", fewer)
        said += f", validation_blocks_to_swap {fewer}"
        chosen.estimate.phases = [
            replace(p, device=p.device + kept_in_place(chosen.estimate, fewer)) if p.name == "validate" else p
            for p in chosen.estimate.phases
        ]
    remember_estimate(ctx.host, config, device_type, folder, chosen.estimate)  # the start's estimate: no second trace
    ctx.log(
        f"memory_budget {size(budget)}: {said}: plan for {size(chosen.estimate.plan_device)} "
        f"(peak {size(chosen.estimate.peak_device)} of tensors), about {chosen.relative_step_time:.2f}x the step "
        "time of the same run checkpointed in bf16 with nothing offloaded (a cost model: tuner.core.estimate.plan)"
    )


def _smallest_over_processes(ctx: RunContext, budget: int) -> int:
    if ctx.accelerator.num_processes == 1:
        return budget
    import torch
    import torch.distributed as dist

    value = torch.tensor([budget], dtype=torch.int64, device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())
