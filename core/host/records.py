"""Plain records passed through hooks. Import-cheap: no torch at module level."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tuner.core.config.values import Config


@dataclass(frozen=True)
class FamilyInfo:
    """A model family a plugin implements.

    ``flavours`` maps a ``model_flavour`` value to the hub id (or local folder) it loads;
    ``default_flavour`` is used when the config sets none.
    """

    name: str
    description: str
    flavours: dict[str, str]
    default_flavour: str
    # tensors every cached text encoding must hold; a cache missing one is refused (rebuild it)
    required_text_keys: tuple[str, ...] = ()
    # the diffusers class of the denoiser and its subfolder: lets the core stream and quantize it
    transformer_class: str = ""
    transformer_subfolder: str = "transformer"
    # the diffusers pipeline class whose LoRA loader is the reference reader of diffusers LoRAs
    pipeline_class: str = ""
    # pipelines of the family's other flavours (Flux.2 klein's Flux2KleinPipeline beside dev's
    # Flux2Pipeline): a model folder whose model_index.json names one of them is the family's too;
    # the family loads its text encoders itself (load_model) where they differ
    other_pipeline_classes: tuple[str, ...] = ()
    # where that loader reads lora_alpha: "tensors" (a scalar .alpha per module, which ComfyUI
    # reads too; Flux and Chroma), "metadata" (diffusers' lora_adapter_metadata; SD3 ignores
    # .alpha tensors) or "folded" (written nowhere: alpha/rank is multiplied into lora_B, so a
    # reader's default scale of 1 is right; Qwen-Image's loader takes .alpha tensors for another
    # trainer's format and ComfyUI ignores metadata)
    lora_alpha_in: str = "tensors"
    # whether ComfyUI loads this family's diffusers-layout LoRA file completely (Flux.2's only in
    # part: ComfyUI maps it through Flux.1's names); if not, the run points to the ComfyUI format
    comfyui_reads_diffusers_files: bool = True
    # the config key `tuner sample --guidance` sets (the scale validation samples with)
    guidance_key: str = "validation_guidance"
    # image sides must be multiples of this (the VAE's downscale times the denoiser's patch size:
    # 8 x 2 for the Flux lineage and SD3); aspect_bucket_alignment must be a multiple of it
    latent_alignment: int = 16
    # the latents the denoiser trains on (what encode_images returns): channels, and image pixels
    # per latent pixel (the Flux lineage: the VAE's 16 channels at 1/8; Flux.2: 2x2 patches of its
    # 32 channels, 128 at 1/16); `tuner sigmas` draws for this shape
    latent_layout: tuple[int, int] = (16, 8)
    # the module holding the family's heavy hooks (torch, diffusers), registered as part of the
    # family when it is selected for a run and first asked for something; the entry-point module
    # stays a cheap manifest (this record, config keys, check_config)
    implementation: str = ""
    # attribute names of the text encoder modules on what load_model("text_encoders") returns, in
    # SimpleTuner's numbering (text_encoder_N_precision quantizes the Nth; offloading moves all)
    text_encoders: tuple[str, ...] = ()
    # capabilities that config keys may need (ConfigKey.needs), e.g. "img2img"
    supports: tuple[str, ...] = ()
    # -- the family's defaults as data: the core's own hooks (``trylast``) answer from these, so a
    # family implements a hook only where its model differs --
    # its values for keys it does not declare itself (the core's flow_schedule_shift, a shared
    # module's keys): the default a run, `tuner keys` and the web UI's form use unless set
    defaults: dict[str, Any] = field(default_factory=dict)
    # LoRA targets: the config key naming a preset or a list of module names (a key the family
    # registers), its presets, and module prefixes never adapted, each with why (a list that names
    # a module under one is refused with that reason)
    # model_type: full: module prefixes that stay frozen by default, each with why
    frozen_in_full: dict[str, str] = field(default_factory=dict)
    lora_target_key: str = ""
    lora_presets: dict[str, Any] = field(default_factory=dict)
    never_adapt: dict[str, str] = field(default_factory=dict)
    # module paths of the denoiser quantization leaves in high precision (everything under them too)
    high_precision: tuple[str, ...] = ()
    # the diffusers classes of the VAE and the inference scheduler (in their "vae" and "scheduler"
    # subfolders); the text encoders load as ``pipeline_class`` without transformer and VAE (its
    # encode_prompt at hand), unless the family answers load_model itself
    vae_class: str = ""
    scheduler_class: str = ""
    # config keys that change a cached text encoding, and a label for the encoding itself (change
    # it when encode_prompts changes): the text cache's fingerprint
    text_cache_keys: tuple[str, ...] = ()
    text_encoding: str = ""
    # encodings differ in length (Qwen-Image's pipelines cut the padding and pad a batch to its
    # longest prompt): each cached row keeps only its ``attention_mask``'s tokens, and a training
    # batch is right-padded with zeros (mask 0) to its longest; otherwise rows are cached as encoded
    text_lengths_vary: bool = False
    # some trainable weights never get a gradient (Qwen-Image's last block: its text stream's
    # outputs are dropped): DDP must look for them every step (find_unused_parameters) or it stops
    # on the second step waiting for their gradients
    unused_weights: bool = False
    # keys offered by the core or a shared module that this family accepts but does not use
    # (a warning when set), and keys it refuses when set to anything but their default: key -> why
    ignored_keys: dict[str, str] = field(default_factory=dict)
    refused_keys: dict[str, str] = field(default_factory=dict)
    plugin: str = ""  # filled in by the host
    distribution: str = ""  # filled in by the host

    @property
    def capabilities(self) -> set[str]:
        """What keys may need: ``supports``, plus ``text_encoder_N`` for each text encoder it names."""
        return set(self.supports) | {f"text_encoder_{n}" for n in range(1, len(self.text_encoders) + 1)}

    def refusal(self, key: ConfigKey) -> str | None:
        """Why this family refuses ``key`` when it is set, or None."""
        if key.name in self.refused_keys:
            return self.refused_keys[key.name]
        if key.needs and key.needs not in self.capabilities:
            return f"{self.name} does not support {key.needs}"
        return None


@dataclass(frozen=True)
class PrecisionInfo:
    """A ``base_model_precision`` value a quantization plugin applies."""

    name: str
    description: str
    requires: tuple[str, ...] = ()  # importable module names the backend needs
    install_hint: str = ""
    # bytes a quantized Linear weight of shape (out_features, in_features) is stored in, scales
    # included, when the model's float dtype takes float_bytes per element; ``tuner estimate``
    # counts quantized weights with it (None: counted unquantized)
    weight_bytes: Callable[[int, int, int], float] | None = None
    # its layers keep their input for the backward pass even with a frozen weight (as
    # optimum-quanto's autograd functions do); ``tuner estimate`` counts those inputs
    keeps_inputs: bool = False
    # quantize(model, unit, exclude): quantize, in place, the plain nn.Linear layers inside
    # ``model.get_submodule(unit)`` (unit "" is the whole model) except the module paths in
    # ``exclude`` and everything under them. Called once per loading unit of the denoiser as
    # its weights arrive, and on whole text encoders (text_encoder_1_precision). Import the
    # library inside it: the plugin's hook module must stay import-cheap.
    quantize: Callable[[Any, str, list[str]], Any] | None = None
    # stored_tensors(tensor): the tensors a quantized weight is stored in beyond its own storage
    # (scales, code tables kept beside it, as bitsandbytes' quant_state); ``tuner estimate`` and
    # the byte counts use it. Tensor subclasses that flatten (quanto) need nothing here.
    stored_tensors: Callable[[Any], list[Any]] | None = None
    # a training step on this base against the same step on the unquantized one, as measured
    # (``benchmarks/gpu.py --tiers``); memory plans weigh the precision by it (None: the core's
    # default, tuner.core.estimate.plan.QUANTIZED_STEP)
    step_time: float | None = None
    plugin: str = ""
    distribution: str = ""


@dataclass(frozen=True)
class OptimizerInfo:
    """An ``optimizer`` value a plugin offers.

    ``build(config, params, options)`` returns a ``torch.optim.Optimizer`` over ``params`` (the
    adapter's fp32 parameters): read ``learning_rate`` and the other keys from ``config``, and
    pass ``options`` (``optimizer_config``, already parsed to a dict) to the constructor so an
    option the optimizer does not take is refused by name. Import the library inside ``build``:
    the plugin's hook module must stay import-cheap. Its state must be tensors, numbers, strings
    or nested dicts of them (checkpoints hold no pickle).
    """

    name: str
    description: str
    build: Callable[[Any, list[Any], dict[str, Any]], Any]
    requires: tuple[str, ...] = ()  # importable module names it needs
    install_hint: str = ""
    # check(config, warn): a last look at the run's settings when this optimizer is chosen: call
    # warn(line) for a setting that works badly with it, raise config.error(key, why) for one that
    # cannot work (Prodigy warns about an AdamW-sized learning_rate)
    check: Callable[[Any, Callable[[str], None]], None] | None = None
    plugin: str = ""
    distribution: str = ""


@dataclass(frozen=True)
class AdapterInfo:
    """A ``lora_type`` value a plugin offers: an adapter peft builds and trains.

    ``peft_config(config, target_modules)`` returns the peft config of the adapter on
    ``target_modules`` (an anchored regex); read ``network_rank``, ``lora_alpha`` and the type's own
    keys from ``config``, and import peft inside it. Training, the estimate, export and the
    self-test need nothing else: the weight change is peft's own arithmetic, and the file's alpha
    is read from peft's scaling, so a type whose scale is not ``alpha / rank`` (rsLoRA) exports
    right without a special case.
    """

    name: str
    description: str
    peft_config: Callable[[Any, str], Any]
    # which runtimes load its pytorch_lora_weights.safetensors fully (said at the start of a run)
    loaded_by: str = "diffusers and ComfyUI"
    # how its weights are stored in a file: "lora" (peft's lora_A/lora_B keys, with a
    # lora_magnitude_vector for DoRA; read by diffusers) or "lycoris" (LyCORIS' lokr_*/hada_* keys
    # with a scalar .alpha; ComfyUI reads them, diffusers cannot). A LoraFormat says which it stores.
    layout: str = "lora"
    # per-module tensors a file of this type must hold beside the layout's own (DoRA's
    # lora_magnitude_vector): `tuner check-lora` refuses a file of this type without them
    required_parts: tuple[str, ...] = ()
    # wraps a packed 4-bit weight (bitsandbytes), whose stored shape is not the layer's
    packed_weights: bool = True
    # applies lora_dropout (set with a type that has none, it is ignored with a warning)
    dropout: bool = True
    # config keys only this type reads: set with another type, they are ignored with a warning
    own_keys: tuple[str, ...] = ()
    # check_layer(config, name, layer): raise config.error(key, why) for a layer it cannot adapt
    # with these settings (LoKr's factor must divide both widths), before peft picks another quietly
    check_layer: Callable[[Any, str, Any], None] | None = None
    # its weight change is a product B @ A of rank network_rank: LoRA tools (resize, merge,
    # extract) apply to it; other types are refused by name
    low_rank: bool = False
    plugin: str = ""
    distribution: str = ""


# How AdapterInfo.layout values are stored (LoraFormat.layouts)
ADAPTER_LAYOUTS = ("lora", "lycoris")
# base_model_precision / text_encoder_N_precision: leave the weights as loaded (no quantizer's)
NO_QUANTIZATION = "no_change"
# Value kinds a ConfigKey can hold.
KINDS = ("str", "int", "float", "bool", "str_list", "str_or_list", "path", "sizes", "mappings")
# The sections keys are shown and listed in (the seed guide's), in order: ConfigKey.group
KEY_GROUPS = ("model", "data", "LoRA", "optimisation", "validation", "saving")
# Where ConfigKey.choices_from takes the allowed values from
CHOICE_SOURCES = ("flavours", "precisions", "adapter_types")


@dataclass(frozen=True)
class ConfigKey:
    """One config key: its kind, default, allowed values and help text.

    ``kind`` is one of ``KINDS``. ``choices`` restricts the value (for ``str_or_list`` it
    restricts the string form only). ``sizes`` takes an int (a square), ``"WIDTHxHEIGHT"``, or a
    list (or comma-separated string) of them, and holds a list of ``[width, height]``. ``nullable`` allows ``null``. ``minimum`` and ``maximum`` bound numbers (every numeric key should
    say its range, so a value only torch would reject is refused when the config is read).
    ``multiple_of`` constrains ints. ``check`` may reject a value by returning a message.
    The fields after ``check`` say where the key is shown (``group``, ``central``, ``in_form``) and
    what it means to the web UI; none of them changes what a value means.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None  # with maximum_exclusive, values must stay below it: [0, 1) for dropout
    maximum_exclusive: bool = False
    multiple_of: int | None = None
    ask: bool = False  # `tuner configure` asks for it (central settings)
    # changing it changes what the adapter means: resuming a checkpoint with another value is refused
    resume_critical: bool = False
    # it changes how images are rendered: recipe.json records it, `tuner sample --recipe` reuses it
    recipe: bool = False
    # a family capability (FamilyInfo.supports) the key needs; a family without it refuses the key
    needs: str = ""
    # a last look at a value of the right kind: a message when it cannot work, else None
    check: Callable[[Any], str | None] | None = field(default=None, compare=False, repr=False)
    # the section it is shown and listed in: one of KEY_GROUPS ("" is model); the web UI's form and
    # `tuner keys` group by it
    group: str = ""
    # shown among its group's central settings (above "advanced") even if `tuner configure` does not ask it
    central: bool = False
    # offered in the web UI's new-run form (False: chosen elsewhere there, like the family, or never)
    in_form: bool = True
    # changing it changes the memory estimate (the web UI's memory panel refreshes on it)
    memory: bool = False
    # its values are what is installed: "flavours" (the family's), "precisions" (no_change and the
    # quantizers') or "adapter_types" (the registered AdapterInfo names), one of CHOICE_SOURCES
    choices_from: str = ""
    # a folder of images and captions (the web UI offers its data picker)
    image_folder: bool = False
    # the default when a workspace holds the run (the web UI's): a path relative to the workspace
    workspace_default: Any = None
    owner: str = ""  # plugin that offered the key; filled in by the host


@dataclass
class ValidationRequest:
    """Everything :func:`generate_images` needs to render one validation round."""

    transformer: Any
    vae: Any
    scheduler: Any
    prompts: list[str]
    text: list[dict[str, torch.Tensor]]  # one cached encoding per prompt, batch dim 1
    negative_text: dict[str, torch.Tensor] | None  # batch dim 1
    seeds: list[int]
    width: int
    height: int
    num_inference_steps: int
    config: Config
    device: Any = None
    reference: Any = None  # edits: the reference image (PIL) the prompts are instructions for


@dataclass
class LoraExport:
    """The trained adapter as handed to :func:`export_lora`.

    ``state_dict`` holds peft names without prefix (``transformer_blocks.0.attn.to_q.lora_A.weight``),
    ``alphas`` the lora_alpha per adapted module path, ``metadata`` tuner's training record.
    """

    state_dict: dict[str, torch.Tensor]
    rank: int
    alphas: dict[str, float]
    metadata: dict[str, Any]
    alpha_in: str = "tensors"  # the family's FamilyInfo.lora_alpha_in
    use_dora: bool = False  # peft's config of the trained adapter says so (diffusers' metadata repeats it)


@dataclass
class LoraReading:
    """A LoRA file as its runtime would apply it, per module of the transformer.

    ``deltas`` maps a module name to the weight change the runtime adds (``scale * B @ A``);
    ``unmatched`` lists the file's keys the runtime would not load.
    """

    deltas: dict[str, torch.Tensor]
    unmatched: list[str]


@dataclass(frozen=True)
class LoraFormat:
    """A LoRA file format (a ``lora_format`` value) a plugin writes and reads.

    ``export(export, transformer)`` returns ``{file name: {key: tensor}}`` for the trained adapter
    (``transformer`` has it attached); ``read(path, transformer, family)`` reads a file the way its
    target runtime does (a :class:`LoraReading`) without changing ``transformer``'s adapters;
    ``detect(keys)`` says whether a file with these tensor names is in this format (``tuner
    check-lora --format auto``). Import heavy libraries inside the functions.
    """

    name: str
    description: str
    export: Callable[[LoraExport, Any], dict[str, dict[str, Any]]]
    read: Callable[[str, Any, FamilyInfo], LoraReading]
    detect: Callable[[list[str]], bool] | None = None
    # the adapter layouts (AdapterInfo.layout) it can store: a fused layout cannot hold a Kronecker
    # or Hadamard product per q/k/v; ``lora_format: all`` leaves a format out for the others, naming it
    layouts: tuple[str, ...] = ADAPTER_LAYOUTS
    plugin: str = ""
    distribution: str = ""


def in_group(group: str, keys: tuple[ConfigKey, ...]) -> tuple[ConfigKey, ...]:
    """``keys`` with ``group`` set where a key names none (a module of keys declares its section once)."""
    from dataclasses import replace

    return tuple(key if key.group else replace(key, group=group) for key in keys)
