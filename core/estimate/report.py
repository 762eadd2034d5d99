"""What an estimate says: phases with their device and RAM bytes, the table, the one-line summary
``tuner run`` prints, and the warnings when a phase will not fit the free memory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

GiB = 2**30
MiB = 2**20
# What the count of live tensors cannot see, by device type: the caching allocator's
# fragmentation (a fraction of the peak) and the runtime's own memory (CUDA context, cuBLAS
# workspaces). Typical values for recent torch and drivers; assumed, not measured by tuner.
ALLOWANCES = {"cuda": (0.10, int(0.5 * GiB)), "mps": (0.10, 0), "cpu": (0.0, 0)}


@dataclass
class Phase:
    """One stretch of a run: the most accelerator memory (bytes of live tensors) and system RAM
    it needs at once, and what makes up its accelerator peak."""

    name: str
    device: int
    ram: int
    parts: dict[str, int] = field(default_factory=dict)


@dataclass
class Estimate:
    family: str
    source: str
    device_type: str
    precision: str
    settings: dict[str, Any]
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_phase(self) -> Phase:
        """The phase needing the most accelerator memory (on the CPU, the most RAM)."""
        if self.device_type == "cpu":
            return max(self.phases, key=lambda p: p.ram)
        return max(self.phases, key=lambda p: p.device)

    @property
    def peak_device(self) -> int:
        """Live tensor bytes at the worst moment: what ``torch.cuda.max_memory_allocated`` reports."""
        return max(p.device for p in self.phases)

    @property
    def plan_device(self) -> int:
        """The peak with the allowances for allocator fragmentation and the runtime."""
        return self.plan(self.peak_device)

    def plan(self, live_bytes: int) -> int:
        """``live_bytes`` of tensors plus the device's allowances (``ALLOWANCES``)."""
        fragmentation, runtime = ALLOWANCES.get(self.device_type, (0.0, 0))
        return int(live_bytes * (1 + fragmentation)) + runtime

    @property
    def peak_ram(self) -> int:
        return max(p.ram for p in self.phases)

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "source": self.source,
            "device_type": self.device_type,
            "base_model_precision": self.precision,
            "settings": self.settings,
            "phases": [vars(p) for p in self.phases],
            "peak_phase": self.peak_phase.name,
            "peak_device_bytes": self.peak_device,
            "plan_device_bytes": self.plan_device,
            "peak_ram_bytes": self.peak_ram,
            "notes": self.notes,
        }

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    def summary(self) -> str:
        if self.device_type == "cpu":  # malloc's slack comes on top: a lower bound (docs/benchmarks.md)
            peak, where = f"at least {size(self.peak_ram)}", "RAM"
        else:
            peak, where = size(self.peak_device), f"{self.device_type} memory"
        text = f"memory estimate ({self.precision}): {peak} of {where} at peak ({self.peak_phase.name})"
        train = self.phase("train")
        if train is not None and train is not self.peak_phase:
            text += f", {size(train.ram if self.device_type == 'cpu' else train.device)} while training"
        if self.device_type != "cpu":
            text += f"; plan for {size(self.plan_device)}; {size(self.peak_ram)} of system RAM"
        return text

    def table(self) -> str:
        s = self.settings
        device = "RAM (tensors)" if self.device_type == "cpu" else f"{self.device_type} (tensors)"
        if s.get("model_type") == "full":  # every trained weight is the denoiser's own
            trained = f"full fine-tune of {s['lora_modules']} modules ({_count(s['lora_parameters'])} parameters)"
            denoiser = s["transformer_parameters"] + s["lora_parameters"]
        else:
            trained = (
                f"LoRA rank {s['network_rank']} on {s['lora_modules']} modules ({_count(s['lora_parameters'])} "
                "parameters)"
            )
            denoiser = s["transformer_parameters"]
        lines = [
            f"{self.family} from {self.source}: {_count(denoiser)}-parameter denoiser, base "
            f"{self.precision}, {s['mixed_precision']}, {trained}, {s['resolution']} px (largest bucket "
            f"{s['largest_bucket']}), batch {s['train_batch_size']}, "
            f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, on {self.device_type}"
            + (f", per process of {s['processes']} (FSDP2)" if s.get("fsdp") else ""),
            f"  {'phase':<16}{device:>16}{'system RAM':>14}",
        ]
        for phase in self.phases:
            device_bytes = size(phase.device) if phase.device else "-"
            lines.append(f"  {phase.name:<16}{device_bytes:>16}{size(phase.ram):>14}")
            if phase.parts:
                lines.append("      " + ", ".join(f"{k} {size(v)}" for k, v in phase.parts.items()))
        lines.append(f"  {'peak':<16}{size(self.peak_device):>16}{size(self.peak_ram):>14}")
        fragmentation, runtime = ALLOWANCES.get(self.device_type, (0.0, 0))
        if fragmentation or runtime:
            lines.append(
                f"plan for {size(self.plan_device)} of {self.device_type} memory: the peak, +{fragmentation:.0%} for "
                f"the caching allocator, +{size(runtime)} for the runtime (CUDA context, workspaces); both assumed"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def size(value: float) -> str:
    return f"{value / GiB:.2f} GiB" if value >= GiB else f"{value / MiB:.1f} MiB"


def process_rss() -> int:
    """Resident size of this process now (Linux), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def free_memory(device_type: str) -> int | None:
    """Bytes free on the accelerator now (``cpu``: available RAM), or None when unknown."""
    if device_type == "cpu":
        return available_ram()
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    if device_type == "mps" and torch.backends.mps.is_available():
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    return None


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# what helps when a phase does not fit, by phase
ADVICE = {
    "load": "a quantized base_model_precision streams the denoiser block by block",
    "load + quantize": "more RAM or swap; the quantized model and one block must fit",
    "encode images": "cache latents once on a bigger machine (cache_dir), or a lower resolution",
    "encode text": "the text encoders run only for captions not cached yet: cache them once on a bigger "
    "machine (cache_dir)",
    "train": "gradient_checkpointing: true, a quantized base_model_precision, a lower resolution or train_batch_size",
    "validate": "a lower validation_resolution, or validation_steps: 0",
}


# what helps first when a caching phase does not fit the accelerator (not RAM: offloading keeps
# the encoders' weights in RAM)
OFFLOAD = "offload_during_startup: true (the encoders' weights stay in RAM, moved in one layer at a time)"
DEVICE_ADVICE = {
    "encode images": OFFLOAD,
    "encode text": f"{OFFLOAD}, or a quantized text_encoder_N_precision",
}


# model_type: full cannot quantize or swap its trained weights: what shrinks its training step
FULL_ADVICE = (
    "bf16_stochastic_rounding: true (bf16 weights: half the weight and gradient memory), optimizer: "
    "adafactor or adamw8bit (a fraction of AdamW's state), gradient_checkpointing: true; `tuner estimate "
    "--set ...` shows each (or train a LoRA)"
)


def shortfalls(found: Estimate, free_device: int | None, free_ram: int | None, full: bool = False) -> list[str]:
    """One line per resource the estimate says will run short, naming the phase and what helps
    (``full``: what helps a full fine-tune)."""
    lines = []
    checks = [("RAM", found.peak_ram, free_ram, max(found.phases, key=lambda p: p.ram))]
    if found.device_type != "cpu":
        checks.insert(0, (f"{found.device_type} memory", found.plan_device, free_device, found.peak_phase))
    for what, needed, free, phase in checks:
        if free is not None and needed > free:
            advice = FULL_ADVICE if full and phase.name == "train" else ADVICE.get(phase.name, "see tuner estimate")
            if what != "RAM" and phase.name in DEVICE_ADVICE:
                advice = f"{DEVICE_ADVICE[phase.name]}; or: {advice}"
            lines.append(f"the run may need {size(needed)} of {what} ({phase.name}) but {size(free)} is free: {advice}")
    return lines
