"""Memory plans (``tuner estimate --plan``): the settings that trade memory for time, each estimated,
and the fastest one that fits a budget.

A plan sets ``base_model_precision``, ``gradient_checkpointing``, ``blocks_to_swap``,
``activation_offload`` and ``offload_during_startup``; a key the user set is a constraint, never
varied. Each plan's peak comes from the estimate (one trace per caching setting, per
checkpointing and per activation offload value; precisions and swapped blocks are arithmetic on
it). Its step time, relative to a bf16 base with checkpointing and nothing offloaded, comes from a
cost model whose constants were measured by ``benchmarks/gpu.py --tiers`` on one H200 (2026-12-04: the real Chroma,
1024 px, rank 16, gradient checkpointing, bf16; docs/benchmarks.md):

* a quantized base: the precision's own ``step_time`` (its plugin states what was measured: int8
  1.07, NF4 1.29, fp8 1.9), else x1.34, SimpleTuner's Chroma sweep on an H100 (int8 1.714 s
  against bf16 1.276 s a step);
* swapping a fraction f of the blocks: x(1 + 0.05 f). Measured +1.6 to +2.4 % for a quarter, half
  and three quarters of the 57 blocks: the copy of the next block overlaps the current block's
  compute (SimpleTuner, which does not overlap, publishes +15 / 35 / 65 %). The slope keeps
  fewer swapped blocks first among plans that fit alike; a slower link or a lower resolution
  (less compute per copied byte) would cost more;
* ``activation_offload``: x1.06 (measured with checkpointing; 1.4 GiB less at 1024 px). Without
  checkpointing every saved activation crosses the link twice a step (about 26 GiB for Chroma at
  1024 px), which no measurement here prices: that combination is a plan only when you set both;
* ``gradient_checkpointing: false``: x0.75, from arithmetic rather than a measurement: per-block
  checkpointing recomputes each block's forward in backward, one forward more on top of a forward
  and a backward that costs two (SimpleTuner's Chroma sweep shows x0.36 for its per-layer
  checkpointing; the GPU benchmark's ``--no-checkpointing`` is to measure tuner's);
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

PLAN_KEYS = (
    "base_model_precision",
    "gradient_checkpointing",
    "blocks_to_swap",
    "activation_offload",
    "offload_during_startup",
)
QUANTIZED_STEP = 1.34
SWAP_STEP_PER_FRACTION = 0.05
ACTIVATION_OFFLOAD_STEP = 1.06
NO_CHECKPOINTING_STEP = 0.75
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
    activations = [bool(config.activation_offload)] if "activation_offload" in fixed else [False, True]
    checkpointings = [bool(config.gradient_checkpointing)] if "gradient_checkpointing" in fixed else [True, False]
    swaps: dict[str, Any] = (
        {"swap_counts": [config.blocks_to_swap]}
        if "blocks_to_swap" in fixed
        else {"swap_fractions": list(SWAP_FRACTIONS)}
    )
    plans = []
    found = estimate_precisions(
        host,
        config,
        precisions,
        device_type,
        offloads=offloads,
        activation_offloads=activations,
        checkpointings=checkpointings,
        **swaps,
    )
    for estimate in found:
        if estimate.settings["activation_offload"] and not estimate.settings["gradient_checkpointing"]:
            if not {"activation_offload", "gradient_checkpointing"} <= fixed:
                continue  # every saved activation over the link each step: its cost is not measured
        settings = {key: estimate.settings[key] for key in PLAN_KEYS if key != "base_model_precision"}
        settings = {"base_model_precision": estimate.precision, **settings}
        plans.append(Plan(settings, estimate, relative_step_time(host, estimate)))
    return sorted(
        plans, key=lambda p: (p.relative_step_time, p.estimate.plan_device, p.settings["offload_during_startup"])
    )


def relative_step_time(host: PluginHost, estimate: Estimate) -> float:
    """The plan's step time against the same run unquantized, checkpointed, nothing offloaded (the
    cost model above)."""
    settings, precision = estimate.settings, estimate.precision
    slower = 1.0
    if precision != NO_QUANTIZATION:
        measured = host.precisions[precision].step_time
        slower *= measured if measured is not None else QUANTIZED_STEP
    slower *= 1 + SWAP_STEP_PER_FRACTION * settings["blocks_to_swap"] / max(settings["transformer_blocks"], 1)
    slower *= 1.0 if settings["gradient_checkpointing"] else NO_CHECKPOINTING_STEP
    return slower * (ACTIVATION_OFFLOAD_STEP if settings["activation_offload"] else 1.0)


def validation_swap(plan: Plan, budget: int) -> int:
    """The fewest blocks validation during the run may swap (``validation_blocks_to_swap``) so that
    its phase, with the others kept on the device, still fits ``budget``; the plan's own count when
    there is no validation or nothing is swapped. Fewer swapped blocks render faster."""
    settings, estimate = plan.settings, plan.estimate
    count = settings["blocks_to_swap"]
    validate = next((p for p in estimate.phases if p.name == "validate"), None)
    if not count or validate is None:
        return count
    for fewer in range(count + 1):
        if estimate.plan(validate.device + kept_in_place(estimate, fewer)) <= budget:
            return fewer
    return count


def kept_in_place(estimate: Estimate, fewer: int) -> int:
    """Device bytes validation adds by swapping ``fewer`` of the plan's swapped blocks instead of all."""
    blocks = estimate.settings["block_bytes"]

    def held(count: int) -> int:  # bytes on the device for a count swapped: the rest, and two of them
        sizes = sorted(blocks[len(blocks) - count :], reverse=True) if count else []
        return -sum(sizes) + sum(sizes[:2])

    return held(fewer) - held(estimate.settings["blocks_to_swap"])


def choose(plans: list[Plan], budget: int, host_memory: int | None = None) -> Plan | None:
    """The fastest plan whose planned device memory fits ``budget`` and whose RAM fits the machine
    (``host_memory``); marked ``chosen``. None when none fits."""
    for plan in plans:
        if plan.estimate.plan_device <= budget and (host_memory is None or plan.estimate.peak_ram <= host_memory):
            plan.chosen = True
            return plan
    return None


def none_fits(plans: list[Plan], budget: int, host_memory: int | None) -> str:
    """Why :func:`choose` found nothing: system RAM (when a plan fits the card) or the card."""
    from tuner.core.estimate.report import size

    fitting = [p for p in plans if p.estimate.plan_device <= budget]
    if fitting and host_memory is not None:  # the card would do: system RAM is short
        least = min(fitting, key=lambda p: p.estimate.peak_ram)
        return (
            f"the plans that fit need at least {size(least.estimate.peak_ram)} of system RAM "
            f"({plan_keys(least.settings)}); {size(host_memory)} is available"
        )
    smallest = min(plans, key=lambda p: p.estimate.plan_device)
    return f"no plan fits; the smallest needs {size(smallest.estimate.plan_device)} ({plan_keys(smallest.settings)})"


def plan_keys(settings: dict) -> str:
    """A plan's settings as a user reads them: ``key value, ...``."""
    return ", ".join(f"{key} {value}" for key, value in settings.items())


def plan_table(plans: list[Plan]) -> str:
    """One line per plan: its keys, planned device memory, peak RAM, relative step time."""
    from tuner.core.estimate.report import size

    lines = [
        f"  {'precision':<14}{'checkpoint':>11}{'swap':>6}{'activations':>13}{'startup':>9}{'plan for':>12}"
        f"{'system RAM':>12}{'step':>7}"
    ]
    for plan in plans:
        keys = plan.settings
        lines.append(
            f"{'*' if plan.chosen else ' '} {keys['base_model_precision']:<14}"
            f"{'yes' if keys['gradient_checkpointing'] else 'no':>11}{keys['blocks_to_swap']:>6}"
            f"{'to RAM' if keys['activation_offload'] else 'kept':>13}"
            f"{'offload' if keys['offload_during_startup'] else 'kept':>9}{size(plan.estimate.plan_device):>12}"
            f"{size(plan.estimate.peak_ram):>12}{plan.relative_step_time:>6.2f}x"
        )
    return "\n".join(lines)


__all__ = [
    "PLAN_KEYS",
    "Plan",
    "choose",
    "kept_in_place",
    "memory_plans",
    "plan_table",
    "relative_step_time",
    "validation_swap",
]
