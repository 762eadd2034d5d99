"""One process's share of a run under FSDP2 (``fsdp_enable`` with several processes), from the
traced estimate of the whole run: arithmetic on its parts, since sharding changes where bytes
live, not what a step computes.

Per process, with P processes:

* weights: 1/P of them (as stored), plus what a block's forward gathers, in the compute dtype
  (``mixed_precision``): the block computing and the one prefetched; with
  ``fsdp_reshard_after_forward: false`` every block stays gathered from its forward to its backward;
* the trained weights' optimizer state and gradients: 1/P, plus one block's whole gradients (fp32)
  while they are reduce-scattered (a full fine-tune's; a LoRA's are negligible); with
  ``bf16_stochastic_rounding`` the weights and their gradients are bf16;
* activations, the batch and the VAE: as in one process (each process computes its own samples).

System RAM per process is unchanged: every process loads the whole denoiser before sharding it
(with ``fsdp_cpu_ram_efficient_loading`` a machine's processes take turns, so a machine needs one
such copy at a time rather than one per process).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tuner.core.estimate.report import Estimate, Phase

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config

STATE = "LoRA + optimizer state"
VALIDATION_STATE = "LoRA, optimizer state, VAE"
GRADIENTS = "batch, gradients, activations"


def per_process(found: Estimate, config: Config, processes: int) -> Estimate:
    """``found`` as one of ``processes`` FSDP2 processes needs it (unchanged without fsdp_enable,
    or with one process: DDP gives every process all of it)."""
    if not config.get("fsdp_enable") or processes <= 1:
        return found
    from tuner.core.training.runtime import trained_dtype, weight_dtype

    stored = trained_dtype(config).itemsize
    cast = weight_dtype(config).itemsize / stored  # a gathered weight is cast to the compute dtype
    blocks = sorted(found.settings.get("block_bytes") or [0], reverse=True)
    trained = found.settings.get("lora_parameters", 0)
    full = config.get("model_type", "lora") == "full"
    train = found.phase("train")
    state = train.parts.get(STATE, 0) if train is not None else 0
    phases = []
    for phase in found.phases:
        weights = phase.parts.get("weights")
        if phase.name not in ("train", "validate") or weights is None:
            phases.append(phase)
            continue
        gathered = int(cast * (weights if not config.get("fsdp_reshard_after_forward", True) else sum(blocks[:2])))
        parts: dict[str, int] = {"weights (1/P, as stored)": weights // processes, "gathered blocks": gathered}
        if phase.name == "train":
            gradients = trained * (stored if full else 4)  # a LoRA's fp32; a full fine-tune's in its weights' dtype
            block_gradients = int(blocks[0] * 4 / stored) if full else 0
            parts[f"{STATE} (1/P)"] = state // processes
            parts[f"{GRADIENTS} (gradients 1/P)"] = (
                max(0, phase.parts.get(GRADIENTS, 0) - gradients) + gradients // processes + block_gradients
            )
        else:
            parts[VALIDATION_STATE + " (state 1/P)"] = max(0, phase.parts.get(VALIDATION_STATE, 0) - state) + (
                state // processes
            )
            parts["activations"] = phase.parts.get("activations", 0)
        phases.append(Phase(phase.name, sum(parts.values()), phase.ram, parts))
    when = "in turns on each machine" if config.get("fsdp_cpu_ram_efficient_loading", True) else "all at once"
    note = (
        f"FSDP2 across {processes} processes: the figures are per process; each process loads the whole "
        f"denoiser into system RAM before sharding it ({when})"
    )
    settings: dict[str, Any] = {**found.settings, "processes": processes, "fsdp": True}
    return replace(found, phases=phases, settings=settings, notes=[*found.notes, note])
