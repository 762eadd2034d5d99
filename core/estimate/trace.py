"""Running a run's code on fake tensors, phase by phase, and counting what is alive.

The caching phases run the family's ``encode_images`` and the text encoders; the training phase
runs :func:`tuner.core.training.step.attach_lora` and the run's own optimizer step
(:meth:`tuner.core.training.stepper.Stepper.optimizer_step`: caption dropout, scheduled sampling,
backward, clipping, the optimizer) with the run's optimizer and EMA; the validation phase runs one
denoiser pass and the VAE decode. Each phase is measured as a :class:`Phase` of live bytes; the base precision's weights
are added afterwards, once per precision (:func:`assemble`).
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_leaves

from tuner.core.config.keys.model import NO_QUANTIZATION
from tuner.core.config.values import model_source
from tuner.core.errors import PluginError
from tuner.core.estimate.live import CountedCopies, LiveBytes, keep_input
from tuner.core.estimate.models import ModelFiles, build_on_meta, tensor_bytes, to_fake
from tuner.core.estimate.report import Estimate, Phase, process_rss
from tuner.core.fixes import no_module_dropout_draw
from tuner.core.model.activations import copies_by
from tuner.core.model.encoders import text_encoder_precisions
from tuner.core.model.swap import repeated_blocks
from tuner.core.training.ema import AdapterEMA
from tuner.core.training.runtime import autocast, build_optimizer, trained_dtype, weight_dtype
from tuner.core.training.runtime import device_type as local_device_type
from tuner.core.training.stepper import StepOutcome, Stepper

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.config.values import Config
    from tuner.core.host.manager import PluginHost


@dataclass
class BaseWeights:
    """The denoiser's weights at one base precision."""

    precision: str
    stored: int  # bytes as stored (quantized layers at the plugin's weight_bytes)
    dequantized: int  # one quantized layer's weight in the compute dtype, while its matmul runs
    keeps_inputs: tuple[str, ...] = ()  # quantized layers whose backend keeps their input for backward
    note: str = ""
    block_bytes: tuple[int, ...] = ()  # each transformer block's weights as stored, in run order


@dataclass
class Trace:
    """What running the run's code on fake tensors measured. Its phases' ``device`` bytes exclude
    the denoiser's weights (added per precision); their ``ram`` is what passes through RAM."""

    traced_weights: int  # the denoiser's weights as traced (unquantized, in the compute dtype)
    largest_block: int  # the biggest loading unit, in the compute dtype (streamed quantization)
    checkpoint_bytes: int  # the denoiser's weight files, memory-mapped while a whole model loads
    phases: list[Phase] = field(default_factory=list)
    # blocks_to_swap: the swapped blocks' weights (in host memory), and the most two of them hold on
    # the device at once (the one computing and the one being copied in)
    swapped: int = 0
    swapped_resident: int = 0
    # validation_blocks_to_swap: validation during the run swaps fewer (the rest stays on the device)
    validation_swapped: int = 0
    validation_resident: int = 0


def estimate(host: PluginHost, config: Config, device_type: str | None = None) -> Estimate:
    """Estimate a run's peak accelerator memory and system RAM from the model's config files."""
    return estimate_precisions(host, config, [config.base_model_precision], device_type)[0]


def estimate_precisions(
    host: PluginHost,
    config: Config,
    precisions: list[str],
    device_type: str | None = None,
    swap_counts: list[int] | None = None,
    swap_fractions: list[float] | None = None,
    offloads: list[bool] | None = None,
    activation_offloads: list[bool] | None = None,
    checkpointings: list[bool] | None = None,
) -> list[Estimate]:
    """One estimate per base precision (and, with ``swap_counts``, per number of swapped blocks for
    each, precision-major: swapping is arithmetic on the traced phases; ``swap_fractions``: those
    fractions of the model's blocks, each count once; ``offloads``: each ``offload_during_startup``
    value, outermost, its caching phases traced once each; ``activation_offloads``: each
    ``activation_offload`` value, inside those; ``checkpointings``: each ``gradient_checkpointing``
    value, inside those). The caching phases are traced once; the training step once per
    checkpointing and activation offload value and distinct behaviour of quantized layers (whether
    their backend keeps inputs for backward)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tuner.core.model.quantize import block_units, import_object

    family = host.family
    device_type = device_type or local_device_type()
    dtype = weight_dtype(config)
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

    def denoiser() -> torch.nn.Module:  # a full fine-tune's weights: fp32 masters, or bf16 (stochastic rounding)
        return build_on_meta(library, class_name, transformer_config, trained_dtype(config))

    transformer = denoiser()
    bases = [base_weights(host, config, transformer, p) for p in precisions]
    units = block_units(transformer)
    traced_weights = tensor_bytes([*transformer.parameters(), *transformer.buffers()])
    largest_block = max(tensor_bytes(transformer.get_submodule(u).parameters()) for u in units)
    checkpoint_bytes = files.weight_bytes(family.transformer_subfolder, transformer)
    blocks = len(repeated_blocks(transformer))
    counts = [config.blocks_to_swap] if swap_counts is None else swap_counts
    if swap_fractions is not None:
        counts = sorted({round(fraction * blocks) for fraction in swap_fractions})
    if max(counts) > blocks:  # the run's own one-line error, said here first
        message = f"{max(counts)} is more than the {blocks} transformer blocks of this model; use at most {blocks}"
        raise config.error("blocks_to_swap", message)

    # real inputs become fake: a step's small draws (sigmas, offsets) are made on real tensors
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    offloads = [bool(config.offload_during_startup)] if offloads is None else offloads
    cachings = {}
    for offload in offloads:
        view = config.derive({"offload_during_startup": offload})
        cachings[offload], latent_shape, vae = trace_caching(host, view, files, components, dtype, mode)
    activations = [bool(config.activation_offload)] if activation_offloads is None else activation_offloads
    checkpointed = [bool(config.gradient_checkpointing)] if checkpointings is None else checkpointings
    steps = [(active, checkpointing) for active in activations for checkpointing in checkpointed]
    traces, estimates = {}, []
    baseline = process_rss()
    for step in steps:
        view = config.derive({"activation_offload": step[0], "gradient_checkpointing": step[1]})
        for base in bases:
            if (step, base.keeps_inputs) not in traces:
                trace = Trace(traced_weights, largest_block, checkpoint_bytes)
                model = transformer if not traces else denoiser()  # the LoRA changes the model it traces
                settings = trace_training(host, view, model, latent_shape, vae, dtype, mode, base.keeps_inputs, trace)
                traces[step, base.keeps_inputs] = (trace, settings)
    for offload in offloads:
        for step in steps:
            active = step[0]
            for base in bases:
                trace, settings = traces[step, base.keeps_inputs]
                for count in counts:
                    swapped, resident = swapped_bytes(base, count)
                    shown_count = (
                        count if config.validation_blocks_to_swap is None else config.validation_blocks_to_swap
                    )
                    validation = swapped_bytes(base, min(shown_count, count))
                    phases = [*cachings[offload], *trace.phases]
                    variant = replace(
                        trace,
                        phases=phases,
                        swapped=swapped,
                        swapped_resident=resident,
                        validation_swapped=validation[0],
                        validation_resident=validation[1],
                    )
                    shown = {
                        **settings,
                        "offload_during_startup": offload,
                        "activation_offload": active,
                        "transformer_blocks": blocks,
                        "blocks_to_swap": count,
                        "block_bytes": list(base.block_bytes),  # as stored, in run order (plans use them)
                    }
                    estimates.append(assemble(family.name, source, device_type, shown, variant, base, baseline))
    return estimates


def swapped_bytes(base: BaseWeights, count: int) -> tuple[int, int]:
    """``blocks_to_swap``: the bytes of ``count`` swapped blocks (as the run picks them: the last) as
    ``base`` stores them, and of the two largest of them."""
    if not count:
        return 0, 0
    blocks = base.block_bytes
    sizes = sorted(blocks[len(blocks) - count :], reverse=True)
    return sum(sizes), sum(sizes[:2])


def base_weights(host: PluginHost, config: Config, transformer: torch.nn.Module, precision: str) -> BaseWeights:
    from tuner.core.model.quantize import plain_linears

    stored = tensor_bytes([*transformer.parameters(), *transformer.buffers()])
    blocks = repeated_blocks(transformer)
    floats = tuple(tensor_bytes(block.parameters()) for _, block in blocks)
    if precision == NO_QUANTIZATION:
        return BaseWeights(precision, stored, 0, block_bytes=floats)
    info = host.precisions[precision]
    if info.weight_bytes is None:
        note = f"{precision} declares no weight_bytes: counted unquantized"
        return BaseWeights(precision, stored, 0, note=note, block_bytes=floats)
    keep = list(host.call("high_precision_modules", transformer=transformer, config=config) or [])
    linears = [transformer.get_submodule(n) for n in plain_linears(transformer, "", keep)]
    stored += quantized_saving(info, linears)
    dequantized = max((tensor_bytes([m.weight]) for m in linears), default=0)
    names = plain_linears(transformer, "", keep) if info.keeps_inputs else []
    quantized = tuple(
        size + quantized_saving(info, [transformer.get_submodule(n) for n in plain_linears(transformer, name, keep)])
        for size, (name, _) in zip(floats, blocks, strict=True)
    )
    return BaseWeights(precision, stored, dequantized, tuple(names), block_bytes=quantized)


def quantized_saving(info: Any, linears: list[torch.nn.Module]) -> int:
    """How the bytes of these Linear weights change when ``info`` stores them (negative: smaller)."""
    full = tensor_bytes(m.weight for m in linears)
    return int(sum(info.weight_bytes(m.out_features, m.in_features, m.weight.element_size()) for m in linears)) - full


def run_offloaded(module: torch.nn.Module, live: LiveBytes) -> list[Any]:
    """Count ``module`` as accelerate's sequential offload runs it: each layer's own weights are on
    the device only while that layer runs. Returns the hook handles (remove them after)."""

    def own(layer: torch.nn.Module) -> list[torch.Tensor]:
        return [*layer.parameters(recurse=False), *layer.buffers(recurse=False)]

    def moved_in(layer: torch.nn.Module, args: Any) -> None:
        live.track(*own(layer))

    def moved_out(layer: torch.nn.Module, args: Any, output: Any) -> None:
        live.untrack(*own(layer))

    handles = []
    for layer in module.modules():
        if own(layer):
            handles += [layer.register_forward_pre_hook(moved_in), layer.register_forward_hook(moved_out)]
    return handles


def trace_caching(host, config, files, components, dtype, mode) -> tuple[list[Phase], tuple[int, ...], torch.nn.Module]:
    """The VAE alone encoding images, then every text encoder together encoding captions; with
    ``offload_during_startup`` their weights stay in RAM and reach the device a layer at a time."""
    from tuner.core.data.cache import TEXT_BATCH, VAE_BATCH

    offloaded = config.offload_during_startup
    phases = []
    vae = to_fake(build_on_meta(*components["vae"], files.json("vae/config.json"), dtype), mode)
    vae_weights = tensor_bytes([*vae.parameters(), *vae.buffers()])
    with mode, LiveBytes() as live, torch.no_grad():
        handles = run_offloaded(vae, live) if offloaded else []
        if not offloaded:
            live.track(vae)
        bucket = largest_bucket(config)  # a bucketed run peaks at its largest bucket
        pixels = torch.zeros(VAE_BATCH, 3, bucket.height, bucket.width, dtype=dtype)
        live.track(pixels)
        latent_shape = tuple(host.provide("encode_images", vae=vae, pixels=pixels, config=config).shape[1:])
    _remove(handles)
    parts = {"VAE, one layer at a time": _largest_layer(vae)} if offloaded else {"VAE": vae_weights}
    phases.append(Phase("encode images", live.peak, vae_weights, parts))
    encoders = [name for name in components if name.startswith("text_encoder")]
    if encoders:
        models = [to_fake(build_on_meta(*components[n], files.json(f"{n}/config.json"), dtype), mode) for n in encoders]
        weights = tensor_bytes({id(t): t for m in models for t in [*m.parameters(), *m.buffers()]}.values())
        saving = 0  # text_encoder_N_precision stores encoder N's Linear weights smaller
        for model, precision in zip(models, text_encoder_precisions(config), strict=False):
            if precision != NO_QUANTIZATION and host.precisions[precision].weight_bytes is not None:
                linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
                saving += quantized_saving(host.precisions[precision], linears)
        wanted = config.to_dict().get("tokenizer_max_length") or 512
        with mode, LiveBytes() as live, torch.no_grad():
            handles = [h for m in models for h in run_offloaded(m, live)] if offloaded else []
            if not offloaded:
                live.track(*models)
            for model in models:
                model(input_ids=torch.zeros(TEXT_BATCH, _encoder_tokens(model.config, wanted), dtype=torch.long))
        _remove(handles)
        # offloaded, a quantized layer reaches the device quantized too: the largest layer is an upper bound
        peak = live.peak + (0 if offloaded else saving)
        layer = max(_largest_layer(m) for m in models)
        parts = {"text encoders, one layer at a time": layer} if offloaded else {"text encoders": weights + saving}
        # RAM: the encoders are loaded whole in system RAM (and quantized there) before they run
        phases.append(Phase("encode text", peak, weights, parts))
    return phases, latent_shape, vae


def trace_training(host, config, transformer, latent_shape, vae, dtype, mode, keeps_inputs, trace) -> dict:
    """The LoRA on the run's targets, a training step as from the second step on, and validation."""
    from tuner.core.config.keys.validation import validation_prompts
    from tuner.core.training.step import attach_lora

    targets = attach_lora(host, config, transformer)  # the same function (and errors) as training
    no_module_dropout_draw(transformer)  # peft's LoKr/LoHa would draw a random number on fake tensors
    for name in keeps_inputs:
        transformer.get_submodule(name).register_forward_hook(keep_input)
    to_fake(transformer, mode)
    params = [p for p in transformer.parameters() if p.requires_grad]
    size = config.resolution
    with mode:
        text = host.provide(
            "example_text", config=config, transformer=transformer, batch_size=config.train_batch_size, dtype=dtype
        )
    if text is None:
        raise PluginError(f"model family {host.family.name} ({host.family.plugin}) does not implement example_text")
    with mode, LiveBytes() as live, copies_by(copies := CountedCopies(live)):
        live.track(transformer, text)
        optimizer = first_step(host, config, params)
        # use_ema: the average beside the adapter (counted while alive; ema_device cpu keeps it in RAM)
        ema = AdapterEMA.from_config(config, transformer, torch.device("cpu")) if config.ema_device != "cpu" else None
        measured = 0
        if optimizer is None:  # it reads values of its state: measured on real tensors instead
            with _disable_current_modes():
                measured = real_state_bytes(host, config, params)
            live.add_bytes(measured)
        resident = live.current
        live.reset_peak()
        training_step(host, config, transformer, latent_shape, text, params, optimizer, dtype, targets)
        del ema
    text_bytes = tensor_bytes(text.values())
    parts = {
        "LoRA + optimizer state": resident - trace.traced_weights - text_bytes,
        "batch, gradients, activations": live.peak - resident + text_bytes,
    }
    trace.phases.append(Phase("train", live.peak - trace.traced_weights, copies.host_peak, parts))

    # validation: the model in eval mode beside the VAE, one denoiser pass, then the decode
    if validation_prompts(config):
        from tuner.core.config.keys.validation import validation_sizes

        val_width, val_height = max(validation_sizes(config), key=lambda s: s[0] * s[1])  # the largest
        *lead, h, _ = latent_shape
        factor = largest_bucket(config).height // h  # pixels per latent pixel
        with mode, LiveBytes() as live, torch.no_grad():
            live.track(transformer, optimizer.state if optimizer else [], vae)
            live.add_bytes(measured)
            resident = live.current
            transformer.eval()
            text = host.provide("example_text", config=config, transformer=transformer, batch_size=1, dtype=dtype)
            latents = torch.zeros(1, *lead, val_height // factor, val_width // factor, dtype=dtype)
            live.track(text, latents)
            with autocast("cpu", dtype):
                host.provide(
                    "predict_flow",
                    transformer=transformer,
                    noisy_latents=latents,
                    sigmas=torch.ones(1),
                    text=text,
                    config=config,
                    generator=torch.Generator(),
                )
            # the VAE's own latents at that size: a family may train on others (Flux.2: in patches)
            vae.decode(host.provide("example_vae_latents", vae=vae, height=val_height, width=val_width, dtype=dtype))
        parts = {"LoRA, optimizer state, VAE": resident - trace.traced_weights, "activations": live.peak - resident}
        trace.phases.append(Phase("validate", live.peak - trace.traced_weights, 0, parts))
    return {
        "mixed_precision": config.mixed_precision,
        "network_rank": config.network_rank,
        "lora_modules": len(targets),
        "model_type": config.get("model_type", "lora"),
        "lora_parameters": sum(p.numel() for p in params),
        "transformer_parameters": sum(p.numel() for p in transformer.parameters() if not p.requires_grad),
        "resolution": size,
        "largest_bucket": str(largest_bucket(config)),
        "train_batch_size": config.train_batch_size,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "offload_during_startup": bool(config.offload_during_startup),
    }


def first_step(host, config, params) -> Any:
    """The run's optimizer after its first step on fake tensors (its state exists from then on), or
    None for one that cannot step on fake tensors: one that reads a value of its state (Prodigy's
    step size) or runs its own kernels (bitsandbytes)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        optimizer = build_optimizer(host, config, params)
        if config.get("bf16_stochastic_rounding"):  # its state is fp32 beside bf16 weights
            from tuner.core.training.full import enable_stochastic_rounding

            enable_stochastic_rounding(optimizer, config.seed)
        optimizer.step()
    except (DataDependentOutputException, RuntimeError, TypeError, NotImplementedError):
        optimizer = None
    for p in params:
        p.grad = None
    return optimizer


def real_state_bytes(host, config, params) -> int:
    """The bytes of the optimizer's state after one step, measured on real tensors of each
    distinct parameter shape (a LoRA has a few) and multiplied by how many parameters share it."""
    shapes = Counter((tuple(p.shape), p.dtype) for p in params)
    total = 0
    for (shape, dtype), count in shapes.items():
        # non-zero: Prodigy keeps a copy of a parameter only when it is not all zeros (LoRA's B
        # starts at zero), so the count is an upper bound
        probe = torch.nn.Parameter(torch.ones(shape, dtype=dtype))
        probe.grad = torch.zeros_like(probe)
        optimizer = build_optimizer(host, config, [probe])
        optimizer.step()
        total += count * tensor_bytes(
            t for t in tree_leaves(list(optimizer.state.values())) if isinstance(t, torch.Tensor)
        )
    return total


class TracingAccelerator:
    """What a step asks of accelerate, for one process on the CPU: the estimate traces the step as one
    process takes it (several processes each hold the same on their device)."""

    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def autocast(self) -> Any:
        return autocast("cpu", self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model: Any) -> Any:
        return nullcontext()

    def clip_grad_norm_(self, params: list[torch.nn.Parameter], limit: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, limit)


class TracingStepper(Stepper):
    """The run's :class:`~tuner.core.training.stepper.Stepper` on fake tensors: the same
    ``optimizer_step`` (tests/test_estimate.py asserts it is the same function), with the decisions
    that need values answered here: the small draws run on real tensors, a traced step is finite,
    and scheduled sampling steps on an evenly spaced grid of the run's length (only the number of
    steps changes memory)."""

    def exact(self) -> Any:
        return _disable_current_modes()

    def finite(self, loss: torch.Tensor, grad_norm: Any) -> bool:
        return True

    def outcome(self, loss, sigmas, grad_norm, sizes, used) -> StepOutcome:
        return StepOutcome(0.0, [], 0.0, sizes, used)

    def inference_grid(self, latent_shape: tuple[int, ...]) -> torch.Tensor:
        config = self.ctx.config
        steps = config.scheduled_sampling_num_inference_steps or config.validation_num_inference_steps
        with _disable_current_modes():
            return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


class _NoStep:
    """An optimizer whose state was measured on real tensors (it cannot step on fake ones)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def training_step(host, config, transformer, latent_shape, text, params, optimizer, dtype, targets) -> None:
    """One optimizer step as training takes it, on fake tensors: the run's own
    :meth:`~tuner.core.training.stepper.Stepper.optimizer_step` (micro-batches with caption dropout
    and scheduled sampling, backward, clipping, the optimizer step)."""
    from tuner.core.config.datasets import resolve
    from tuner.core.training import rollout
    from tuner.core.training.guard import DivergenceGuard
    from tuner.core.training.state import Position, RunContext, TrainState

    if rollout.enabled(config):  # the step that holds the most: every sample rolls out
        config = config.derive({"scheduled_sampling_probability": 1.0, "scheduled_sampling_ramp_steps": 0})
    ctx = RunContext(host, config, TracingAccelerator(dtype), dtype, lambda message: None)
    datasets = resolve(config)
    empty = {name: value[0] for name, value in text.items()}  # the cached "" encoding, one sample
    stepper = TracingStepper(ctx, datasets, [empty if d.config.caption_dropout_probability else {} for d in datasets])
    state = TrainState(
        model=transformer,
        wrapped=transformer,
        optimizer=optimizer if optimizer is not None else _NoStep(params),
        lr_scheduler=None,
        params=params,
        targets=targets,
        guard=DivergenceGuard.from_config(config),
        position=Position(),
    )
    batch = {
        "latents": torch.zeros(config.train_batch_size, *latent_shape),
        "text": text,
        "size": [0, 0],
        # a regularisation dataset trained towards the base model's prediction takes one more forward
        "dataset": next((i for i, d in enumerate(datasets) if d.config.regularisation_target == "base_model"), 0),
    }
    with torch.random.fork_rng(devices=[]):  # the step seeds LoRA dropout; the caller's stream stays
        stepper.optimizer_step(state, iter([batch] * config.gradient_accumulation_steps))


def assemble(family, source, device_type, settings, trace: Trace, base: BaseWeights, baseline) -> Estimate:
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
    for traced in trace.phases:
        if traced.name in ("train", "validate"):
            # swapped blocks (on an accelerator): on the device two at a time, in RAM all, as stored;
            # validation may swap fewer (validation_blocks_to_swap)
            validating = traced.name == "validate"
            swap = 0 if on_cpu else trace.validation_swapped if validating else trace.swapped
            resident = trace.validation_resident if validating else trace.swapped_resident
            weights = base.stored - swap + (resident if swap else 0)
            device = traced.device + weights + base.dequantized
            parts = {("weights (swapped blocks: two at a time)" if swap else "weights"): weights, **traced.parts}
            if base.dequantized:
                parts["dequantized layer"] = base.dequantized
            # activation offload: what blocks save for backward waits in RAM (traced.ram)
            # RAM: the host copies of every swapped block, whichever are in place on the device
            phases.append(
                Phase(traced.name, device, baseline + traced.ram + (device if on_cpu else trace.swapped), parts)
            )
        else:  # caching: the encoders' weights pass through RAM (and stay there when offloaded)
            ram = baseline + (max(traced.device, traced.ram) if on_cpu else traced.ram)
            phases.append(Phase(traced.name, traced.device, ram, traced.parts))
    notes = [base.note] if base.note else []
    notes.append("the caching phases run only for images and captions not cached yet")
    return Estimate(family, source, device_type, base.precision, settings, phases, notes)


def largest_bucket(config: Config) -> Any:
    """The bucket with the most pixels, of every dataset: where a run's activations peak."""
    from tuner.core.config.datasets import resolve
    from tuner.core.data.buckets import bucket_sizes

    views = [d.config for d in resolve(config)] or [config]
    buckets = [
        b
        for c in views
        for b in bucket_sizes(c.resolution, c.resolution_type, c.aspect_bucket_alignment, c.aspect_bucket_max_ratio)
    ]
    return max(buckets, key=lambda b: (b.width * b.height, -abs(b.width - b.height)))


def _largest_layer(module: torch.nn.Module) -> int:
    return max(
        (tensor_bytes([*m.parameters(recurse=False), *m.buffers(recurse=False)]) for m in module.modules()), default=0
    )


def _remove(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _encoder_tokens(model_config: Any, wanted: int) -> int:
    limits = [getattr(model_config, k, None) for k in ("max_position_embeddings", "n_positions")]
    return min([wanted, *[v for v in limits if isinstance(v, int)]])
