"""The contract between tuner's core and its plugins: every hook, in the order a run meets them.

Three shapes of hook (``docs/plugins.md`` shows when each fires during a run):

* **register** hooks: the plugin calls ``register(...)`` once per thing it offers, so the host
  knows which plugin offered what. Families and precisions are registered by every installed
  plugin; config keys and LoRA formats by the plugins of the run.
* **provide** hooks are ``firstresult``: the first non-``None`` answer wins and the rest are not
  called.
* **contribute** hooks collect the answers of every plugin in the run.

Who answers a provide hook does not depend on any plugin's name. A run's plugins are the core,
every plugin that registers no family (quantizers, trackers, extensions) and the selected
family, registered in that order, and pluggy calls the last registered first. So:

1. an extension's ``@hookimpl(tryfirst=True)`` answers before the family (an explicit override);
2. otherwise the selected family answers its own hooks;
3. then any other plugin's plain implementation (for a hook the family does not implement);
4. last the core's defaults (``trylast``).

A ``@hookimpl(wrapper=True)`` wraps all of them and may change the answer (for example trimming
the LoRA targets of a family).

A family's entry point is a cheap manifest: ``register_families``, ``register_config_keys``,
``register_lora_formats`` and ``check_config``. Its heavy hooks live in the module named by
``FamilyInfo.implementation``, which the host imports and registers as part of the family the
first time a run asks for a hook; that module may not implement register hooks or
``check_config`` (they run before it is loaded).

Implementations must not give their parameters default values (pluggy never overrides them) and
may accept any subset of a hook's parameters. This module imports neither torch nor diffusers:
annotation types are imported only for type checkers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tuner.core import hookspec

if TYPE_CHECKING:  # pragma: no cover - import-cheap module
    import torch
    import typer

    from tuner.core.config.values import Config
    from tuner.core.host.events import TrainEvent
    from tuner.core.host.records import (
        AdapterInfo,
        ConfigKey,
        FamilyInfo,
        LoraFormat,
        OptimizerInfo,
        PrecisionInfo,
        ValidationRequest,
    )

# --------------------------------------------------------------------------------------------
# Registration: called on every installed plugin, when the host is built.
# --------------------------------------------------------------------------------------------


@hookspec
def register_families(register: Callable[[FamilyInfo], None]) -> None:
    """Offer model families.

    Called once when a plugin host is built, on every installed plugin. Call
    ``register(FamilyInfo(...))`` for the family this plugin implements (at most one family per
    plugin: the family's provide hooks are this plugin's hooks and those of the module named by
    ``FamilyInfo.implementation``). A plugin that registers no family (a quantizer, a tracker, an
    extension) takes part in every run.

    Two plugins registering the same family name is an error naming both distributions.
    """


@hookspec
def register_config_keys(register: Callable[[ConfigKey], None]) -> None:
    """Offer config keys.

    Called when a run's config is validated, on the core and on every plugin of that run (so a
    family's keys exist only when that family is selected). Call ``register(ConfigKey(...))`` once
    per key; a key's ``aliases`` are accepted in files and on ``--set`` and renamed to the key.
    A key offered twice is an error naming both plugins.
    """


@hookspec
def register_precisions(register: Callable[[PrecisionInfo], None]) -> None:
    """Offer base-model precisions for ``base_model_precision`` (quantization backends).

    Called on every installed plugin when the host is built. Call ``register(PrecisionInfo(...))``
    for each precision: its ``quantize`` function quantizes the denoiser unit by unit as it
    streams in (and whole text encoders for ``text_encoder_1_precision``), its ``weight_bytes``
    and ``stored_tensors`` let ``tuner estimate`` count it. Two plugins registering one name is an
    error naming both.
    """


@hookspec
def register_optimizers(register: Callable[[OptimizerInfo], None]) -> None:
    """Offer optimizers for the ``optimizer`` key.

    Called on every installed plugin when the host is built. Call ``register(OptimizerInfo(...))``
    for each optimizer: its ``build(config, params, options)`` makes the optimizer over the
    adapter's parameters (``options``: the parsed ``optimizer_config``). The core registers
    ``adamw``; the bundled ``optimizers`` plugin ``adamw8bit``, ``adafactor`` and ``prodigy``. The
    optimizer's state goes into checkpoints as tensors and JSON (never pickle), so a resume is
    exact. Two plugins registering one name is an error naming both.
    """


@hookspec
def register_adapter_types(register: Callable[[AdapterInfo], None]) -> None:
    """Offer adapter types for the ``lora_type`` key.

    Called on every installed plugin when the host is built. Call ``register(AdapterInfo(...))``
    for each type: its ``peft_config(config, target_modules)`` builds the peft config the run
    attaches; the record says how its file is laid out, which runtimes load it, which keys only it
    reads and what ``tuner check-lora`` requires of its files. The core registers ``lora``, ``dora``,
    ``lokr`` and ``loha``. Two plugins registering one name is an error naming both.
    """


@hookspec
def register_lora_formats(register: Callable[[LoraFormat], None]) -> None:
    """Offer LoRA file formats (``lora_format`` values) for the run's family.

    Called when a run's config is validated, on the core and on every plugin of that run. Call
    ``register(LoraFormat(...))`` once per format with its exporter and reader; every final LoRA
    file is written by the exporter and reread by the reader (the self-test). The core registers
    ``diffusers``; the Flux lineage registers ``comfyui``. ``lora_format: all`` (or ``both``)
    writes every registered format.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``tuner`` command line.

    Called on every installed plugin when the CLI starts, with the root ``typer.Typer`` app. Keep
    the command's heavy imports inside the command function: this runs on every ``tuner`` call.
    """


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@hookspec
def check_config(config: Config, warn: Callable[[str], None]) -> None:
    """Validate relations between keys after every key has its type checked.

    Called once per run on every plugin of the run, after types, choices and aliases are
    resolved. Raise :class:`tuner.core.errors.ConfigError` with a one-line message naming the key
    for a setting that cannot work, or call ``warn(message)`` for one that is ignored. May set
    derived values with ``config.set_default(key, value)``.
    """


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def load_model(config: Config, component: str, dtype: torch.dtype, family: FamilyInfo) -> Any:
    """Load one component of the selected family's model.

    Called lazily, only when the component is needed: ``"transformer"`` (the denoiser that gets
    the LoRA; load it with weights in ``dtype``), ``"vae"`` (needed to cache latents and to decode
    validation images), ``"text_encoders"`` (anything :func:`encode_prompts` accepts; only loaded
    when a caption or prompt is missing from the cache) and ``"scheduler"`` (the inference
    scheduler used for validation). Returns the component; stops at the first non-None result.
    ``family`` is the run's record (the host passes it). The core's default (``trylast``) loads
    ``family.transformer_class``, ``vae_class`` and ``scheduler_class`` from their subfolders and
    the text encoders as ``pipeline_class`` without transformer and VAE, with one-line errors;
    a family answers itself where its layout differs.
    """


@hookspec(firstresult=True)
def high_precision_modules(transformer: Any, config: Config, family: FamilyInfo) -> list[str]:
    """Full module paths of the denoiser that quantization must leave in high precision.

    Called once before a quantized load, with the denoiser built on the meta device (module
    names are there, weights are not). The family answers (embedders, output projection, norms,
    Chroma's approximator); everything under a listed path stays unquantized (the precision's
    ``quantize`` gets them as ``exclude``). Stops at the first non-None result. The core's
    default answers ``family.high_precision`` (those the model has).
    """


# --------------------------------------------------------------------------------------------
# Data and caches
# --------------------------------------------------------------------------------------------


@hookspec
def cache_fingerprint(config: Config, kind: str, family: FamilyInfo) -> dict[str, Any]:
    """Settings that change what a cache of ``kind`` (``"latents"`` or ``"text"``) holds.

    Called on every plugin of the run when caches are opened; all answers are merged into the
    cache's key, so a cache is reused only when the model and these settings match. Return a
    JSON-serializable dict, or None. The core adds ``family.text_cache_keys`` and
    ``family.text_encoding`` to the text cache's key.
    """


@hookspec(firstresult=True)
def encode_prompts(
    text_encoders: Any, prompts: list[str], config: Config, device: torch.device, references: list[Any] | None
) -> dict[str, torch.Tensor]:
    """Encode a batch of captions or prompts for caching.

    ``references``: for edit pairs (families that support ``edit``), the reference image (PIL, at
    the size :func:`reference_sizes` gives the encoder) each prompt is encoded with; None otherwise.

    Called only for texts missing from the text cache, with ``device`` the device the encoders
    compute on: put token ids there (with ``offload_during_startup`` the encoders' weights live in
    system RAM between layers, so ``encoder.device`` does not say). Returns a dict of tensors whose first
    dimension is ``len(prompts)``; it must include ``"attention_mask"`` (bool, ``[B, tokens]``)
    for families that mask text attention. Each row is cached and later handed back, batched, to
    :func:`predict_flow` and :func:`generate_images`. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def encode_images(vae: Any, pixels: torch.Tensor, config: Config) -> torch.Tensor:
    """Encode images (``[B, 3, H, W]`` in ``[-1, 1]``) to the normalized latents the denoiser trains on.

    Called only for images missing from the latent cache, with ``pixels`` already on the device
    and in the dtype the VAE computes in. The core's default uses the VAE's
    latent mean with its ``shift_factor`` and ``scaling_factor``. Stops at the first non-None
    result.
    """


@hookspec(firstresult=True)
def example_text(config: Config, transformer: Any, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What :func:`encode_prompts` would return for ``batch_size`` captions, without any text encoder.

    Called by ``tuner estimate`` (and at the start of ``tuner run``) with ``transformer`` built
    from its config on the meta device, inside torch's ``FakeTensorMode``: build the tensors
    with ``torch.zeros``/``torch.ones`` so they carry shapes and dtypes but no memory. The same
    keys, shapes and dtypes as a real encoding (``dtype`` is what the encoders run in); the
    contract kit (``tuner.testing.contract``) checks that. Stops at the first non-None result;
    a family without it gets no memory estimate.
    """


@hookspec
def export_full_model(transformer: Any, config: Config) -> dict[str, dict[str, torch.Tensor]] | None:
    """``model_type: full``: single files for other runtimes, ``{file name: {key: tensor}}``, beside
    the diffusers folder the core writes (``transformer/``). The Flux lineage writes ComfyUI's layout
    (BFL names, q/k/v fused). Called once at the end of a full fine-tune (and for the EMA's files);
    every plugin's answer is written.
    """


@hookspec(firstresult=True)
def reference_sizes(config: Config, width: int, height: int) -> dict[str, tuple[int, int]]:
    """Edit pairs: the ``(width, height)`` a ``width`` x ``height`` reference image is resized to
    for the VAE (``"vae"``: its latents go beside the noisy ones) and for the text encoder
    (``"encoder"``: a vision-language encoder sees it with the instruction), as the family's edit
    pipeline sizes them. Called by families that support ``edit``. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def example_vae_latents(vae: Any, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Latents the VAE's own ``decode`` takes for a ``height`` x ``width`` image, batch 1 (what a
    pipeline decodes; a family may train on other latents, as Flux.2 on 2x2 patches).

    Called by ``tuner estimate`` inside ``FakeTensorMode`` (build with ``torch.zeros``) to trace
    validation's decode. The core's default: ``[1, latent_channels, h, w]`` at a downscale of
    2^(len(block_out_channels) - 1). Stops at the first non-None result.
    """


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def lora_target_modules(config: Config, transformer: Any, family: FamilyInfo) -> list[str]:
    """The peft ``target_modules`` for the denoiser's LoRA (dotted suffixes or full names).

    Called once per run after the transformer is loaded. A wrapper may trim or extend the list.
    The core refuses a list that matches no module. Stops at the first non-None result. The
    core's default reads ``family.lora_target_key`` (a preset of ``family.lora_presets`` or a
    list of names) and refuses names under ``family.never_adapt``.
    """


@hookspec(firstresult=True)
def sample_sigmas(
    config: Config, batch_size: int, latent_shape: tuple[int, ...], generator: torch.Generator
) -> torch.Tensor:
    """Draw one noise level sigma in (0, 1) per sample: a float32 tensor of shape ``[batch_size]``.

    Called every training step (and by ``tuner sigmas``). Draw only from ``generator`` so runs
    are reproducible. The core's default is logit-normal with the static or resolution-dependent
    shift. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def predict_flow(
    transformer: Any,
    noisy_latents: torch.Tensor,
    sigmas: torch.Tensor,
    text: dict[str, torch.Tensor],
    config: Config,
    generator: torch.Generator,
) -> torch.Tensor:
    """Run the denoiser and return its velocity prediction in the shape of ``noisy_latents``.

    Called every training step inside autocast. ``text`` holds the batched tensors that
    :func:`encode_prompts` cached. The family packs latents, builds position ids and attention
    masks here; any random draw it needs (a guidance value per sample) comes from ``generator``.
    The core computes ``loss = mse(prediction, noise - latents)``. Stops at the first non-None
    result.
    """


@hookspec(firstresult=True)
def inference_sigmas(config: Config, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The sigmas the family samples ``num_steps`` steps with at ``latent_shape``, descending from
    (about) 1 and ending with 0 (``num_steps + 1`` values).

    Called when scheduled sampling (``scheduled_sampling_max_step_offset``) rolls samples out: their
    Euler steps climb this schedule, so the model sees the inputs its own inference produces.
    ``scheduler`` is the family's inference scheduler (``load_model("scheduler")``). The core's
    default asks a flow-matching scheduler of diffusers (``set_timesteps(sigmas=..., mu=...)``) as
    the Flux and SD3 pipelines do, with the resolution-dependent shift of 2x2-patch transformers.
    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def generate_images(request: ValidationRequest) -> list[Any]:
    """Render validation images (PIL) with the training transformer, one per prompt and seed.

    Called every ``validation_steps`` and at the end of a run, under ``torch.no_grad`` with the
    transformer in eval mode. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def recipe_snippet(recipe: dict[str, Any]) -> str:
    """Python code that reproduces the validation images of ``recipe`` with diffusers alone.

    Called when a LoRA is saved with validation prompts; the snippet goes into the README of the
    output folder next to ``recipe.json``. ``recipe`` holds the base model, LoRA file and scale,
    prompts, negative prompt, seeds, size, steps, guidance and scheduler config. Stops at the first
    non-None result.
    """


@hookspec
def training_event(event: TrainEvent) -> None:
    """Observe the run: called on every plugin of the run, on the main process only.

    ``event`` is one of the dataclasses of :mod:`tuner.core.host.events`, each with its own typed
    fields besides ``step``, ``config`` and ``log``: ``RunStart``, ``StepEnd``, ``Skip`` (a
    non-finite step was dropped), ``Rollback``, ``Evaluation`` (the held-out eval loss),
    ``Validation``, ``Save`` and ``RunEnd``. Dispatch
    with ``isinstance``. Use it for loggers and trackers: the core's JSONL log and TensorBoard
    tracker are such plugins, and a wandb or other tracker is a package implementing this hook.
    """
