"""Plain records passed through hooks. Import-cheap: no torch at module level."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tuner.core.config import Config


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
    # where that loader reads lora_alpha: "tensors" (a scalar .alpha per module, which ComfyUI
    # reads too; Flux and Chroma) or "metadata" (diffusers' lora_adapter_metadata; SD3 ignores
    # .alpha tensors)
    lora_alpha_in: str = "tensors"
    # the config key `tuner sample --guidance` sets (the scale validation samples with)
    guidance_key: str = "validation_guidance"
    plugin: str = ""  # filled in by the host
    distribution: str = ""  # filled in by the host


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
    plugin: str = ""
    distribution: str = ""


# Value kinds a ConfigKey can hold.
KINDS = ("str", "int", "float", "bool", "str_list", "str_or_list", "path")


@dataclass(frozen=True)
class ConfigKey:
    """One config key: its kind, default, allowed values and help text.

    ``kind`` is one of ``KINDS``. ``choices`` restricts the value (for ``str_or_list`` it
    restricts the string form only). ``nullable`` allows ``null``. ``minimum`` bounds numbers.
    ``multiple_of`` constrains ints. ``check`` may reject a value by returning a message.
    """

    name: str
    kind: str
    default: Any = None
    help: str = ""
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    minimum: float | None = None
    multiple_of: int | None = None
    ask: bool = False  # `tuner configure` asks for it (central settings)
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


@dataclass
class LoraReading:
    """A LoRA file as its runtime would apply it, per module of the transformer.

    ``deltas`` maps a module name to the weight change the runtime adds (``scale * B @ A``);
    ``unmatched`` lists the file's keys the runtime would not load.
    """

    deltas: dict[str, torch.Tensor]
    unmatched: list[str]


@dataclass
class TrainEvent:
    """What :func:`training_event` observers see. ``data`` depends on ``name``."""

    name: str  # run_start | step_end | validation | save | run_end
    step: int
    config: Config
    data: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
