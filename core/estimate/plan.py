"""Memory plans (``tuner estimate --plan``): the settings that trade memory for time, each estimated,
and the fastest one that fits a budget.

A plan sets ``base_model_precision``, ``blocks_to_swap`` and ``offload_during_startup``; a key the
user set is a constraint, never varied. Each plan's peak comes from the estimate (one trace per
caching setting; precisions and swapped blocks are arithmetic on it). Its relative step time comes
from a cost model whose constants are the peers' published figures, stated here, until a GPU
session measures tuner's own (``benchmarks/gpu.py``):

* a quantized base: x1.34, SimpleTuner's Chroma sweep on an H100 (int8 1.714 s against bf16
  1.276 s a step, both with per-layer checkpointing);
* swapping a fraction f of the blocks: x(1 + 0.7 f), SimpleTuner's block-swap table for Flux-shaped
  models (14 / 28 / 48 of 57 blocks: +15 / 35 / 65 %); overlapping the copy should beat it;
* ``offload_during_startup``: x1 (it slows caching only, which runs once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuner.core.config.keys.model import NO_QUANTIZATION
from tuner.core.estimate.report import Estimate
from tuner.core.estimate.trace import estimate_precisions

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost

PLAN_KEYS = ("base_model_precision", "blocks_to_swap", "offload_during_startup")
QUANTIZED_STEP = 1.34
SWAP_STEP_PER_FRACTION = 0.7
SWAP_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Plan:
    settings: dict[str, Any]  # the PLAN_KEYS' values
    estimate: Estimate
    relative_step_time: float  # against the same run in the precision given, nothing swapped
    chosen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "keys": self.settings,
            "peak_device_bytes": self.estimate.peak_device,
            "plan_device_bytes": self.estimate.plan_device,
            "peak_host_bytes": self.estimate.peak_ram,
            "relative_step_time": round(self.relative_step_time, 3),
            "chosen": self.chosen,
        }


def memory_plans(host: PluginHost, config: Config, device_type: str | None = None) -> list[Plan]:
    """Every plan the settings allow, fastest first (then the smallest peak)."""
    fixed = {key for key in PLAN_KEYS if config.is_set(key)}
    precisions = (
        [config.base_model_precision]
        if "base_model_precision" in fixed
        else [NO_QUANTIZATION, *sorted(p for p, info in host.precisions.items() if info.weight_bytes is not None)]
    )
    offloads = [bool(config.offload_during_startup)] if "offload_during_startup" in fixed else [False, True]
    swaps: dict[str, Any] = (
        {"swap_counts": [config.blocks_to_swap]}
        if "blocks_to_swap" in fixed
        else {"swap_fractions": list(SWAP_FRACTIONS)}
    )
    plans = []
    for estimate in estimate_precisions(host, config, precisions, device_type, offloads=offloads, **swaps):
        precision, count = estimate.precision, estimate.settings["blocks_to_swap"]
        swapped = count / max(estimate.settings["transformer_blocks"], 1)
        slower = (QUANTIZED_STEP if precision != NO_QUANTIZATION else 1.0) * (1 + SWAP_STEP_PER_FRACTION * swapped)
        offload = estimate.settings["offload_during_startup"]
        settings = {"base_model_precision": precision, "blocks_to_swap": count, "offload_during_startup": offload}
        plans.append(Plan(settings, estimate, slower))
    return sorted(
        plans, key=lambda p: (p.relative_step_time, p.estimate.plan_device, p.settings["offload_during_startup"])
    )


def choose(plans: list[Plan], budget: int, host_memory: int | None = None) -> Plan | None:
    """The fastest plan whose planned device memory fits ``budget`` and whose RAM fits the machine
    (``host_memory``); marked ``chosen``. None when none fits."""
    for plan in plans:
        if plan.estimate.plan_device <= budget and (host_memory is None or plan.estimate.peak_ram <= host_memory):
            plan.chosen = True
            return plan
    return None


def plan_table(plans: list[Plan]) -> str:
    """One line per plan: its keys, planned device memory, peak RAM, relative step time."""
    from tuner.core.estimate.report import size

    lines = [f"  {'precision':<14}{'swap':>6}{'offload':>9}{'plan for':>12}{'system RAM':>12}{'step':>7}"]
    for plan in plans:
        keys = plan.settings
        lines.append(
            f"{'*' if plan.chosen else ' '} {keys['base_model_precision']:<14}{keys['blocks_to_swap']:>6}"
            f"{'yes' if keys['offload_during_startup'] else 'no':>9}{size(plan.estimate.plan_device):>12}"
            f"{size(plan.estimate.peak_ram):>12}{plan.relative_step_time:>6.2f}x"
        )
    return "\n".join(lines)


__all__ = ["PLAN_KEYS", "Plan", "choose", "memory_plans", "plan_table"]
