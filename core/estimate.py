"""Peak memory of a run, estimated before any weight is loaded (``tuner estimate``; ``tuner run``
prints it first).

Not a formula: the family's models are built from their config files on the meta device and run
through what a run runs (the family's hooks, peft's LoRA, tuner's checkpointing, the optimizer)
on fake tensors (torch's ``FakeTensorMode``: shapes and dtypes, no storage), while
:class:`LiveBytes` counts the bytes of every tensor alive at each moment. A quantized base is
counted at its precision plugin's stored size (``PrecisionInfo.weight_bytes``), plus one layer
dequantized for its matmul.

What the count cannot see is added as stated allowances (``ALLOWANCES``: the caching allocator's
fragmentation and the CUDA context; assumptions, not measurements) or measured: system RAM starts
from the resident size of the process that estimates, which is the one that trains under
``tuner run``.
"""

from __future__ import annotations

import importlib
import json
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tuner.core.config import NO_QUANTIZATION, model_source
from tuner.core.errors import PluginError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config import Config
    from tuner.core.plugins import PluginHost

GiB = 2**30
MiB = 2**20
# What the count of live tensors cannot see, by device type: the caching allocator's
# fragmentation (a fraction of the peak) and the runtime's own memory (CUDA context, cuBLAS
# workspaces). Typical values for recent torch and drivers; assumed, not measured by tuner.
ALLOWANCES = {"cuda": (0.10, int(0.5 * GiB)), "mps": (0.10, 0), "cpu": (0.0, 0)}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive: those registered with :meth:`track` and every
    output of an operator run inside the mode. A storage counts until it is freed, once however
    many tensors view it. Works on real and fake tensors alike."""

    def __init__(self) -> None:
        super().__init__()
        self._alive: dict[int, weakref.ref] = {}
        self.current = 0
        self.peak = 0

    def track(self, *objects: Any) -> int:
        """Count these tensors (modules: their parameters and buffers); returns the bytes added."""
        added = 0
        for obj in tree_leaves(list(objects)):
            if isinstance(obj, torch.nn.Module):
                added += self.track(*obj.parameters(), *obj.buffers())
            elif isinstance(obj, torch.Tensor):
                for storage in _storages(obj):
                    added += self._add(storage)
        return added

    def reset_peak(self) -> None:
        self.peak = self.current

    def _add(self, storage: torch.UntypedStorage) -> int:
        key = id(storage)
        if key in self._alive and self._alive[key]() is storage:
            return 0
        size = storage.nbytes()
        self._alive[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.current += size
        self.peak = max(self.peak, self.current)
        return size

    def _free(self, key: int, size: int) -> None:
        self._alive.pop(key, None)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


def _storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    if hasattr(tensor, "__tensor_flatten__") and not isinstance(tensor, torch._subclasses.FakeTensor):
        names, _ = tensor.__tensor_flatten__()  # a wrapper subclass (quanto): count its inner tensors
        return [s for name in names for s in _storages(getattr(tensor, name))]
    state = getattr(tensor, "quant_state", None)  # bitsandbytes keeps scales beside the weight
    if state is not None:
        from tuner.core.quantize import quant_state_tensors

        return [tensor.untyped_storage(), *(t.untyped_storage() for t in quant_state_tensors(state))]
    return [tensor.untyped_storage()]


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
        lines = [
            f"{self.family} from {self.source}: {_count(s['transformer_parameters'])}-parameter denoiser, base "
            f"{self.precision}, {s['mixed_precision']}, LoRA rank {s['network_rank']} on {s['lora_modules']} modules "
            f"({_count(s['lora_parameters'])} parameters), {s['resolution']} px, batch {s['train_batch_size']}, "
            f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, on {self.device_type}",
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


# -- model files ------------------------------------------------------------------------------


class ModelFiles:
    """The config files of a diffusers model folder or hub repository; never its weights."""

    def __init__(self, source: str, revision: str | None):
        self.source, self.revision = source, revision

    def json(self, name: str) -> dict[str, Any]:
        folder = Path(self.source)
        if folder.is_dir():
            path = folder / name
            if not path.is_file():
                raise PluginError(f"{path} is missing: the estimate needs the model's config files")
        else:
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(self.source, name, revision=self.revision))
            except Exception as exc:  # the hub client raises many kinds
                raise PluginError(
                    f"cannot read {name} of {self.source!r} ({first_line(exc)}); the estimate needs only the "
                    "config files (a few KB), from the hub or a local diffusers folder"
                ) from None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise PluginError(f"{path}: not valid JSON ({first_line(exc)})") from None

    def weight_bytes(self, subfolder: str, model: torch.nn.Module) -> int:
        """Size of a component's safetensors files in a local folder; otherwise (a hub id, a
        folder of config files) its parameters in bf16, as Chroma and Flux checkpoints hold them."""
        files = list((Path(self.source) / subfolder).glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files)
        return 2 * sum(p.numel() for p in model.parameters())

    def components(self) -> dict[str, tuple[str, str]]:
        """Component name -> (library, class) from ``model_index.json``."""
        index = self.json("model_index.json")
        return {k: tuple(v) for k, v in index.items() if isinstance(v, list) and len(v) == 2 and all(v)}


def build_on_meta(library: str, class_name: str, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers or transformers model built from its config with every parameter on meta."""
    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), class_name)
    with init_empty_weights(), warnings.catch_warnings():
        # diffusers' own Flux-lineage models construct a class it has deprecated
        warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)
        if getattr(cls, "config_class", None) is not None:  # transformers
            model = cls(cls.config_class.from_dict(config))
        else:  # diffusers
            model = cls.from_config(config)
    # torch's own cast: diffusers' `to` warns about fp32 modules, which matter for weights only
    model = torch.nn.Module.to(model, dtype)
    _tie_shared_weights(model)
    return model


def _tie_shared_weights(model: torch.nn.Module) -> None:
    """Share the parameters a transformers model declares tied (T5's encoder embedding is its
    ``shared`` table): checkpoints store them once, so they count once."""
    tied = getattr(model, "_tied_weights_keys", None)
    for target, source in tied.items() if isinstance(tied, dict) else []:
        owner, _, name = target.rpartition(".")
        try:
            setattr(model.get_submodule(owner), name, model.get_parameter(source))
        except AttributeError:  # not in this variant of the model
            continue


def to_fake(module: torch.nn.Module, mode: Any) -> torch.nn.Module:
    """Swap every parameter and buffer for a fake tensor of the same shape and dtype, in place
    (tied parameters stay tied)."""
    swapped: dict[int, torch.Tensor] = {}

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in swapped:
            if tensor.device.type == "meta":
                value = torch.empty(tensor.shape, dtype=tensor.dtype)
            else:
                value = mode.from_tensor(tensor)
            if isinstance(tensor, torch.nn.Parameter):
                value = torch.nn.Parameter(value, requires_grad=tensor.requires_grad)
            swapped[id(tensor)] = value
        return swapped[id(tensor)]

    with mode:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, tensor in list(table.items()):
                    if tensor is not None:
                        table[name] = fake(tensor)
    return module


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# -- the estimate -----------------------------------------------------------------------------


@dataclass
class BaseWeights:
    """The denoiser's weights at one base precision."""

    precision: str
    stored: int  # bytes as stored (quantized layers at the plugin's weight_bytes)
    dequantized: int  # one quantized layer's weight in the compute dtype, while its matmul runs
    keeps_inputs: tuple[str, ...] = ()  # quantized layers whose backend keeps their input for backward
    note: str = ""


@dataclass
class Trace:
    """What running the run's code on fake tensors measured, as (peak bytes, parts, RAM on the way)
    per phase; the train and validate peaks exclude the denoiser's weights."""

    traced_weights: int  # the denoiser's weights as traced (unquantized, in the compute dtype)
    largest_block: int  # the biggest loading unit, in the compute dtype (streamed quantization)
    checkpoint_bytes: int  # the denoiser's weight files, memory-mapped while a whole model loads
    phases: dict[str, tuple[int, dict[str, int], int]] = field(default_factory=dict)


def estimate(host: PluginHost, config: Config, device_type: str | None = None) -> Estimate:
    """Estimate a run's peak accelerator memory and system RAM from the model's config files."""
    return estimate_precisions(host, config, [config.base_model_precision], device_type)[0]


def estimate_precisions(
    host: PluginHost, config: Config, precisions: list[str], device_type: str | None = None
) -> list[Estimate]:
    """One estimate per base precision. The caching phases are traced once; the training step once
    per distinct behaviour of quantized layers (whether their backend keeps inputs for backward)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tuner.core.quantize import block_units, import_object
    from tuner.core.train import WEIGHT_DTYPES

    family = host.family
    device_type = device_type or accelerator_type()
    dtype = WEIGHT_DTYPES[config.mixed_precision]
    source = model_source(config, family.flavours)
    if not family.transformer_class:
        raise PluginError(f"model family {family.name} ({family.plugin}) declares no transformer_class to estimate")
    unknown = [p for p in precisions if p != NO_QUANTIZATION and p not in host.precisions]
    if unknown:
        known = ", ".join([NO_QUANTIZATION, *sorted(host.precisions)])
        raise PluginError(f"base_model_precision {unknown[0]!r} is not installed; choose from {known}")
    files = ModelFiles(source, config.revision)
    components = files.components()
    if "vae" not in components:
        raise PluginError(f"{source}: model_index.json lists no vae; the estimate needs its config")
    library, _, class_name = family.transformer_class.rpartition(".")
    import_object(family.transformer_class)  # a one-line error when the class is missing
    transformer_config = files.json(f"{family.transformer_subfolder}/config.json")

    def denoiser() -> torch.nn.Module:
        return build_on_meta(library, class_name, transformer_config, dtype)

    transformer = denoiser()
    bases = [_base_weights(host, config, transformer, p) for p in precisions]
    units = block_units(transformer)
    traced_weights = tensor_bytes([*transformer.parameters(), *transformer.buffers()])
    largest_block = max(tensor_bytes(transformer.get_submodule(u).parameters()) for u in units)
    checkpoint_bytes = files.weight_bytes(family.transformer_subfolder, transformer)

    mode = FakeTensorMode()
    caching, latent_shape, vae = _trace_caching(host, config, files, components, dtype, mode)
    traces, estimates = {}, []
    baseline = process_rss()
    for base in bases:
        if base.keeps_inputs not in traces:
            trace = Trace(traced_weights, largest_block, checkpoint_bytes, dict(caching))
            model = transformer if not traces else denoiser()  # the LoRA changes the model it traces
            settings = _trace_training(host, config, model, latent_shape, vae, dtype, mode, base.keeps_inputs, trace)
            traces[base.keeps_inputs] = (trace, settings)
        trace, settings = traces[base.keeps_inputs]
        estimates.append(_assemble(family.name, source, device_type, settings, trace, base, baseline))
    return estimates


def _base_weights(host: PluginHost, config: Config, transformer: torch.nn.Module, precision: str) -> BaseWeights:
    from tuner.core.quantize import plain_linears

    stored = tensor_bytes([*transformer.parameters(), *transformer.buffers()])
    if precision == NO_QUANTIZATION:
        return BaseWeights(precision, stored, 0)
    info = host.precisions[precision]
    if info.weight_bytes is None:
        return BaseWeights(precision, stored, 0, note=f"{precision} declares no weight_bytes: counted unquantized")
    keep = list(host.hook.high_precision_modules(transformer=transformer, config=config) or [])
    names = plain_linears(transformer, "", keep)
    linears = [transformer.get_submodule(n) for n in names]
    stored -= tensor_bytes(m.weight for m in linears)
    stored += int(sum(info.weight_bytes(m.out_features, m.in_features, m.weight.element_size()) for m in linears))
    dequantized = max((tensor_bytes([m.weight]) for m in linears), default=0)
    return BaseWeights(precision, stored, dequantized, tuple(names) if info.keeps_inputs else ())


def _trace_caching(host, config, files, components, dtype, mode) -> tuple[dict, tuple[int, ...], torch.nn.Module]:
    """The VAE alone encoding images, then every text encoder together encoding captions."""
    from tuner.core.cache import TEXT_BATCH, VAE_BATCH

    phases = {}
    vae = to_fake(build_on_meta(*components["vae"], files.json("vae/config.json"), dtype), mode)
    vae_weights = tensor_bytes([*vae.parameters(), *vae.buffers()])
    with mode, LiveBytes() as live, torch.no_grad():
        live.track(vae)
        pixels = torch.zeros(VAE_BATCH, 3, config.resolution, config.resolution, dtype=dtype)
        live.track(pixels)
        latent_shape = tuple(host.provide("encode_images", vae=vae, pixels=pixels, config=config).shape[1:])
    phases["encode images"] = (live.peak, {"VAE": vae_weights}, vae_weights)
    encoders = [name for name in components if name.startswith("text_encoder")]
    if encoders:
        models = [to_fake(build_on_meta(*components[n], files.json(f"{n}/config.json"), dtype), mode) for n in encoders]
        weights = tensor_bytes({id(t): t for m in models for t in [*m.parameters(), *m.buffers()]}.values())
        wanted = config.to_dict().get("tokenizer_max_length") or 512
        with mode, LiveBytes() as live, torch.no_grad():
            live.track(*models)
            for model in models:
                model(input_ids=torch.zeros(TEXT_BATCH, _encoder_tokens(model.config, wanted), dtype=torch.long))
        phases["encode text"] = (live.peak, {"text encoders": weights}, weights)
    return phases, latent_shape, vae


def _trace_training(host, config, transformer, latent_shape, vae, dtype, mode, keeps_inputs, trace) -> dict:
    """The LoRA on the run's targets, a training step as from the second step on, and validation."""
    from tuner.core.builtin import validation_prompts
    from tuner.core.fixes import checkpoint_blocks
    from tuner.core.lora import add_lora, resolve_targets
    from tuner.core.train import build_optimizer

    patterns = host.provide("lora_target_modules", config=config, transformer=transformer)
    targets = resolve_targets(transformer, patterns)
    if not targets:
        raise PluginError(f"{config.source}: LoRA targets {patterns!r} match no Linear module of the model")
    add_lora(transformer, targets, config)
    for name in keeps_inputs:
        transformer.get_submodule(name).register_forward_hook(_keep_input)
    if config.gradient_checkpointing:
        checkpoint_blocks(transformer)
    to_fake(transformer, mode)
    params = [p for p in transformer.parameters() if p.requires_grad]
    size = config.resolution
    with mode:
        text = host.provide(
            "example_text", config=config, transformer=transformer, batch_size=config.train_batch_size, dtype=dtype
        )
    if text is None:
        raise PluginError(f"model family {host.family.name} ({host.family.plugin}) does not implement example_text")
    with mode, LiveBytes() as live:
        live.track(transformer, text)
        optimizer = build_optimizer(config, params)
        for p in params:  # the optimizer's state exists from the first step on
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        resident = live.current
        live.reset_peak()
        _training_step(host, config, transformer, latent_shape, text, params, optimizer, dtype)
    text_bytes = tensor_bytes(text.values())
    parts = {
        "LoRA + optimizer state": resident - trace.traced_weights - text_bytes,
        "batch, gradients, activations": live.peak - resident + text_bytes,
    }
    trace.phases["train"] = (live.peak - trace.traced_weights, parts, 0)

    # validation: the model in eval mode beside the VAE, one denoiser pass, then the decode
    if validation_prompts(config):
        val_size = config.validation_resolution or size
        *lead, h, w = latent_shape
        with mode, LiveBytes() as live, torch.no_grad():
            live.track(transformer, optimizer.state, vae)
            resident = live.current
            transformer.eval()
            text = host.provide("example_text", config=config, transformer=transformer, batch_size=1, dtype=dtype)
            latents = torch.zeros(1, *lead, h * val_size // size, w * val_size // size, dtype=dtype)
            live.track(text, latents)
            with _autocast(dtype):
                host.provide(
                    "predict_flow",
                    transformer=transformer,
                    noisy_latents=latents,
                    sigmas=torch.ones(1),
                    text=text,
                    config=config,
                    generator=torch.Generator(),
                )
            vae.decode(latents)
        parts = {"LoRA, optimizer state, VAE": resident - trace.traced_weights, "activations": live.peak - resident}
        trace.phases["validate"] = (live.peak - trace.traced_weights, parts, 0)
    return {
        "mixed_precision": config.mixed_precision,
        "network_rank": config.network_rank,
        "lora_modules": len(targets),
        "lora_parameters": sum(p.numel() for p in params),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
        "resolution": size,
        "train_batch_size": config.train_batch_size,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
    }


class _SavedInput(torch.autograd.Function):
    """Passes ``output`` through, keeping ``inputs`` until the backward pass reaches it."""

    @staticmethod
    def forward(ctx, inputs, output):
        ctx.save_for_backward(inputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def _keep_input(module, args, output):
    """Forward hook: the layer keeps its input for backward, as a quantized backend's autograd
    function does even when the weight is frozen."""
    inputs = args[0] if args else None
    if isinstance(inputs, torch.Tensor) and torch.is_grad_enabled() and (inputs.requires_grad or output.requires_grad):
        return _SavedInput.apply(inputs, output)
    return output


def _assemble(family, source, device_type, settings, trace: Trace, base: BaseWeights, baseline) -> Estimate:
    """Phases for one base precision. On the CPU the device is the RAM; on an accelerator, weights
    pass through RAM on their way to it."""
    on_cpu = device_type == "cpu"
    phases = []
    # weight files are memory-mapped; a cast to another dtype makes a copy beside the mapping
    files = trace.checkpoint_bytes
    cast = not 0.9 * trace.traced_weights <= files <= 1.1 * trace.traced_weights  # a dtype change halves or doubles
    if base.precision == NO_QUANTIZATION:  # loaded whole, then moved to the device
        parts = {"weight files": files, **({"cast copy": base.stored} if cast else {})}
        phases.append(Phase("load", 0, baseline + sum(parts.values()), parts))
    else:  # streamed: the quantized model plus one block in flight, as read (and cast)
        block = trace.largest_block * files // max(trace.traced_weights, 1) + (trace.largest_block if cast else 0)
        parts = {"quantized weights": base.stored, "block in flight": block}
        phases.append(Phase("load + quantize", 0, baseline + base.stored + block, parts))
    for name in ("encode images", "encode text"):
        if name in trace.phases:
            peak, parts, ram_in = trace.phases[name]
            phases.append(Phase(name, peak, baseline + (peak if on_cpu else ram_in), parts))
    for name in ("train", "validate"):
        if name in trace.phases:
            peak, parts, _ = trace.phases[name]
            device = peak + base.stored + base.dequantized
            parts = {"weights": base.stored, **parts}
            if base.dequantized:
                parts["dequantized layer"] = base.dequantized
            phases.append(Phase(name, device, baseline + (device if on_cpu else 0), parts))
    notes = [base.note] if base.note else []
    notes.append("the caching phases run only for images and captions not cached yet")
    return Estimate(family, source, device_type, base.precision, settings, phases, notes)


def _training_step(host, config, transformer, latent_shape, text, params, optimizer, dtype) -> None:
    from tuner.core import flow

    batch = config.train_batch_size
    latents = torch.zeros(batch, *latent_shape)
    sigmas = torch.rand(batch)
    noisy, target = flow.noisy_and_target(latents, torch.randn_like(latents), sigmas)
    with _autocast(dtype):
        prediction = host.provide(
            "predict_flow",
            transformer=transformer,
            noisy_latents=noisy.to(dtype),
            sigmas=sigmas,
            text=text,
            config=config,
            generator=torch.Generator(),
        )
    loss = flow.flow_loss(prediction, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


def _encoder_tokens(model_config: Any, wanted: int) -> int:
    limits = [getattr(model_config, k, None) for k in ("max_position_embeddings", "n_positions")]
    return min([wanted, *[v for v in limits if isinstance(v, int)]])


def accelerator_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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


def shortfalls(found: Estimate, free_device: int | None, free_ram: int | None) -> list[str]:
    """One line per resource the estimate says will run short, naming the phase and what helps."""
    lines = []
    checks = [("RAM", found.peak_ram, free_ram, max(found.phases, key=lambda p: p.ram))]
    if found.device_type != "cpu":
        checks.insert(0, (f"{found.device_type} memory", found.plan_device, free_device, found.peak_phase))
    for what, needed, free, phase in checks:
        if free is not None and needed > free:
            lines.append(
                f"the run may need {size(needed)} of {what} ({phase.name}) but {size(free)} is free: "
                f"{ADVICE.get(phase.name, 'see tuner estimate')}"
            )
    return lines
