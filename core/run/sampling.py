"""Rendering images outside training with exactly what validation used: `tuner sample` and recipes.

A recipe (``output_dir/recipe.json``, written with every final LoRA that has validation prompts)
records the base model, the LoRA file and scale, prompts, negative prompt, seeds, size, steps,
guidance and the settings that shape sampling. ``tuner sample --recipe recipe.json`` renders the
same images through the same hooks; the README beside it carries a diffusers-only snippet.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tuner.core import __version__
from tuner.core.config.keys.model import NO_QUANTIZATION
from tuner.core.config.values import model_source
from tuner.core.host.records import ValidationRequest
from tuner.core.io import atomic_write, resolved_if_local

RECIPE = "recipe.json"


def make_recipe(
    host: Any,
    config: Any,
    lora_file: Path,
    scheduler: Any,
    prompts: list[str],
    seeds: list[int],
    sizes: list[tuple[int, int]],
) -> dict[str, Any]:
    family = host.family
    return {
        "tuner_version": __version__,
        "family": family.name,
        "pipeline_class": family.pipeline_class,
        # local paths resolved: the recipe works from any folder
        "base_model": resolved_if_local(model_source(config, family.flavours)),
        "lora_file": str(Path(lora_file).resolve()),
        "lora_scale": 1.0,
        "prompts": prompts,
        "negative_prompt": config.validation_negative_prompt or "",
        "seeds": seeds,
        "width": sizes[0][0],  # the first size (the diffusers snippet renders it)
        "height": sizes[0][1],
        "sizes": [list(size) for size in sizes],
        "steps": config.validation_num_inference_steps,
        "guidance_key": family.guidance_key,
        "guidance": config.get(family.guidance_key),
        "scheduler": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        # every key flagged `recipe` by whoever offers it (the family's own sampling keys too)
        "settings": {k: resolved_if_local(v) for k, v in config.flagged("recipe").items()},
    }


def write_recipe(folder: Path, recipe: dict[str, Any], snippet: str | None) -> Path:
    path = atomic_write(folder / RECIPE, lambda tmp: Path(tmp).write_text(json.dumps(recipe, indent=1)))
    lines = [
        f"# LoRA trained with tuner {recipe['tuner_version']}",
        "",
        f"Base model `{recipe['base_model']}` ({recipe['family']}), LoRA `{Path(recipe['lora_file']).name}`.",
        "Reproduce the validation images with tuner:",
        "",
        "```bash",
        f"tuner sample --recipe {path}",
        "```",
    ]
    if snippet:
        lines += ["", "or with diffusers alone:", "", "```python", snippet.rstrip(), "```"]
    atomic_write(folder / "README.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    return path


RECIPE_KEYS = ("family", "lora_file", "prompts", "seeds", "settings", "steps", "negative_prompt", "guidance_key")


def recipe_problem(recipe: Any) -> str | None:
    """What makes a recipe unusable (the keys it lacks), or None."""
    if not isinstance(recipe, dict):
        return "not a JSON object"
    missing = [key for key in RECIPE_KEYS if key not in recipe]
    if not recipe.get("sizes") and not ("width" in recipe and "height" in recipe):
        missing.append("sizes")
    if missing:
        return f"missing {', '.join(missing)} (written by another tool, or edited?)"
    if not isinstance(recipe["settings"], dict):
        return "settings is not a mapping"
    return None


def recipe_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """The config a recipe samples with."""
    settings = {k: v for k, v in recipe["settings"].items() if v is not None}
    settings.update(
        {
            "validation_num_inference_steps": recipe["steps"],
            "validation_negative_prompt": recipe["negative_prompt"],
            "validation_resolution": recipe.get("sizes") or [[recipe["width"], recipe["height"]]],
            recipe["guidance_key"]: recipe.get("guidance"),
        }
    )
    return settings


def apply_lora(
    transformer: torch.nn.Module, lora_file: str, family: Any, scale: float = 1.0, quantized: bool = False
) -> None:
    """Load a LoRA onto the transformer as a user's diffusers pipeline would (load_lora_weights)."""
    import inspect

    from tuner.core.errors import ConfigError
    from tuner.core.fixes import damaged_safetensors
    from tuner.core.model.pipelines import partial_pipeline
    from tuner.core.model.quantize import import_object

    damaged = damaged_safetensors([lora_file])
    if damaged is not None:  # not "does not load onto this model": the file itself is broken
        raise ConfigError(f"--lora {damaged}")
    pipeline_cls = import_object(family.pipeline_class)
    pipe = partial_pipeline(pipeline_cls, transformer=transformer)
    shapes = _linear_shapes(transformer)
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # its notice about the absent text encoder is noise here
    try:
        if quantized and "return_alphas" in inspect.signature(pipeline_cls.lora_state_dict).parameters:
            # the Flux-style loader first checks each LoRA against its base weight in state_dict(),
            # which a quanto base stores as weight._data (KeyError; tuner.core.fixes): its two other
            # steps, without that check (it serves Flux Control LoRAs only)
            state_dict, alphas, metadata = pipeline_cls.lora_state_dict(
                lora_file, return_alphas=True, return_lora_metadata=True
            )
            pipeline_cls.load_lora_into_transformer(
                state_dict, network_alphas=alphas, transformer=transformer, adapter_name="sample", metadata=metadata
            )
        else:
            pipe.load_lora_weights(lora_file, adapter_name="sample")
    except Exception as exc:  # another family's file, another layout: said, not traced
        from tuner.core.errors import first_line

        raise ConfigError(
            f"--lora {lora_file}: does not load onto this {family.name} model ({first_line(exc)}); "
            f"`tuner check-lora {lora_file} --plugin {family.name}` says which keys do not fit"
        ) from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    _check_fit(shapes, transformer, lora_file, family)
    for name, param in transformer.named_parameters():
        if ".lora_" in name:  # as in training and validation: fp32 adapters over a bf16 base (else the
            param.data = param.data.float()  # recipe renders 1-2 levels off its validation images)
    if scale != 1.0:
        transformer.set_adapters(["sample"], weights=[scale])


def _linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (module.out_features, module.in_features)
        for name, module in transformer.named_modules()
        if hasattr(module, "in_features") and hasattr(module, "out_features") and not hasattr(module, "base_layer")
    }


def _check_fit(before: dict[str, tuple[int, int]], transformer: torch.nn.Module, lora_file: str, family: Any) -> None:
    """A LoRA of another model loads without a word: peft builds each layer from the file's shapes
    and diffusers' Flux-style loader even widens base layers to match (for Flux Control LoRAs), and
    the first matmul fails deep in torch or the image is garbage. Every base layer keeps its shape."""
    from tuner.core.errors import ConfigError

    for name, module in transformer.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or name not in before:
            continue
        shape = (base.out_features, base.in_features)
        if shape != before[name]:
            raise ConfigError(
                f"--lora {lora_file}: {name} is {shape[0]}x{shape[1]} in the file but {before[name][0]}x{before[name][1]} "
                f"in this {family.name} model: a LoRA of another model; "
                f"`tuner check-lora {lora_file} --plugin {family.name}` lists every layer"
            )


def render(
    host: Any,
    config: Any,
    prompts: list[str],
    seeds: list[int],
    lora: str | None,
    sizes: list[tuple[int, int]],
    scale: float = 1.0,
) -> list[list[Any]]:
    """Load the base, apply the LoRA, encode, and render through the family's generate_images:
    the images of every prompt, per size."""
    from tuner.core.model.encoders import load_text_encoders
    from tuner.core.training.runtime import autocast, device_type, weight_dtype

    dtype = weight_dtype(config)  # the rule training and validation follow
    device = torch.device(device_type())
    load = lambda component: host.provide("load_model", config=config, component=component, dtype=dtype)  # noqa: E731
    reference, references = edit_reference(host, config)
    encoders = load_text_encoders(host, config, device, dtype)
    texts = [*prompts, config.validation_negative_prompt or ""]
    with torch.no_grad():  # one text per batch, as training cached its validation prompts
        encoded = [
            host.provide(
                "encode_prompts",
                text_encoders=encoders,
                prompts=[t],
                config=config,
                device=device,
                references=references,
            )
            for t in texts
        ]
    del encoders
    text, negative = encoded[:-1], encoded[-1]
    swap = sample_blocks_to_swap(config)
    if config.get("base_model_precision", NO_QUANTIZATION) != NO_QUANTIZATION:  # the base validation rendered on
        from tuner.core.model.quantize import load_quantized

        transformer = load_quantized(host, config, dtype, device)
    else:
        transformer = load("transformer") if swap else load("transformer").to(device)
    if lora:
        apply_lora(transformer, lora, host.family, scale, quantized=config.base_model_precision != NO_QUANTIZATION)
    if swap:  # the swapped blocks' weights stay in host memory, brought in block by block
        from tuner.core.model.swap import move_unswapped, swap_blocks

        swap_blocks(transformer, swap, device, config.error)
        move_unswapped(transformer, device)
    if config.mixed_precision != "no":  # as in training, whose validation this reproduces: accelerate
        from tuner.core.training.runtime import new_accelerator  # runs the model under autocast, hands back fp32

        accelerator = new_accelerator(config.mixed_precision)  # placed above (swapped storages must not be copied)
        transformer = accelerator.prepare_model(transformer, device_placement=False, evaluation_mode=True)
    vae, scheduler = load("vae").to(device), load("scheduler")
    request = ValidationRequest(
        transformer=transformer.eval(),
        vae=vae,
        scheduler=scheduler,
        prompts=prompts,
        text=text,
        negative_text=negative,
        seeds=seeds,
        width=sizes[0][0],
        height=sizes[0][1],
        num_inference_steps=config.validation_num_inference_steps,
        config=config,
        device=device,
        reference=reference,
    )
    # as validation renders: under accelerate's autocast
    return [images for _, images in render_sizes(host, request, sizes, lambda: autocast(device.type, dtype))]


def edit_reference(host: Any, config: Any) -> tuple[Any, list[Any] | None]:
    """Edits (``validation_reference_image``): the reference as the pipeline takes it, and as the
    text encoder sees it beside each prompt (the family's ``reference_sizes``), as training cached
    its validation prompts; (None, None) otherwise."""
    if not config.get("validation_reference_image"):
        return None, None
    from tuner.core.data.pairs import open_reference, reference_sizes

    path = Path(config.validation_reference_image)
    return open_reference(path), [open_reference(path, reference_sizes(host, config, path)["encoder"])]


def sample_blocks_to_swap(config: Any) -> int:
    """Blocks ``tuner sample`` swaps: ``validation_blocks_to_swap`` when set (sampling holds no
    gradients or optimizer state, so it often needs fewer), else ``blocks_to_swap``."""
    chosen = config.get("validation_blocks_to_swap")
    return config.get("blocks_to_swap", 0) if chosen is None else chosen


def render_sizes(
    host: Any, request: ValidationRequest, sizes: list[tuple[int, int]], autocast: Any
) -> Iterator[tuple[tuple[int, int], list[Any]]]:
    """The family's ``generate_images`` for ``request`` at each ``(width, height)``, without
    gradients, each inside a fresh ``autocast()``: validation and ``tuner sample`` both render here."""
    for width, height in sizes:
        with torch.no_grad(), autocast():
            images = host.provide("generate_images", request=replace(request, width=width, height=height))
        yield (width, height), images
