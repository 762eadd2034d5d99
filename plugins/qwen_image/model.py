"""Qwen-Image's hooks (its ``FamilyInfo.implementation``, registered with the family when a run
selects it). Every semantic is the pipelines' own (diffusers' ``pipeline_qwenimage.py``,
``pipeline_qwenimage_edit.py`` and ``pipeline_qwenimage_edit_plus.py``); docs/qwen-image.md lists
each with its source."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from tuner.core import hookimpl
from tuner.core.api import PluginError, Pretrained, flow, load_component, model_source, partial_pipeline, render
from tuner.plugins.qwen_image.plugin import EDIT_PIPELINES, FAMILY


@functools.lru_cache(maxsize=8)
def _config_file(source: str, revision: str | None, name: str) -> dict[str, Any]:
    """A JSON file of the model (a local folder's, else the hub cache's; {} when unreadable)."""
    path = Path(source) / name
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, name, revision=revision))
        except Exception:  # offline without a cached copy: the flavour decides, diffusers' defaults apply
            return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model_file(config: Any, name: str) -> dict[str, Any]:
    return _config_file(model_source(config, FAMILY.flavours), config.revision, name)


def pipeline_name(config: Any) -> str:
    """The model's own pipeline: what its model_index.json names, else what its flavour is."""
    name = _model_file(config, "model_index.json").get("_class_name")
    if name in ("QwenImagePipeline", *EDIT_PIPELINES):
        return name
    return {"edit": "QwenImageEditPipeline", "edit-2509": "QwenImageEditPlusPipeline"}.get(
        config.model_flavour, "QwenImagePipeline"
    )


def is_edit(config: Any) -> bool:
    return pipeline_name(config) in EDIT_PIPELINES


@hookimpl
def load_model(config: Any, component: str, dtype: torch.dtype) -> Any:
    if component != "text_encoders":
        return None  # the core loads the classes FAMILY declares
    import diffusers

    from tuner.plugins.qwen_image import fixes

    hub = Pretrained(model_source(config, FAMILY.flavours), config.revision, dtype)
    cls = getattr(diffusers, pipeline_name(config))

    def text_side() -> Any:  # Qwen2.5-VL, its tokenizer and (edits) its processor
        components = {}
        if cls.__name__ in EDIT_PIPELINES and fixes.torchvision_missing():
            components["processor"] = fixes.still_image_processor(fixes.processor_folder(hub.source, config.revision))
        return hub.text_pipeline(cls, **components)

    return load_component(FAMILY.name, hub.source, "text_encoders", {"text_encoders": text_side})


@hookimpl
def encode_prompts(
    text_encoders: Any, prompts: list[str], config: Any, device: Any, references: list[Any] | None
) -> dict[str, torch.Tensor]:
    """The pipeline's encode_prompt: the prompt template, Qwen2.5-VL's last hidden state with the
    template's first tokens dropped (34 text-to-image, 64 edit), cut to ``tokenizer_max_length``;
    an edit's instruction is encoded with its reference image. Padded to the batch's longest with
    the mask (the core caches each prompt's own tokens: ``text_lengths_vary``)."""
    name = type(text_encoders).__name__
    if name in EDIT_PIPELINES and references is None:
        raise PluginError(
            f"{name} trains on edit pairs: set conditioning_data_dir (the reference images) and, to validate, "
            "validation_reference_image"
        )
    if references is None:
        rows = [
            text_encoders.encode_prompt(prompt=prompts, device=device, max_sequence_length=config.tokenizer_max_length)
        ]
    elif name == "QwenImageEditPipeline":  # one image per prompt, in order
        rows = [
            text_encoders.encode_prompt(
                prompt=prompts, image=references, device=device, max_sequence_length=config.tokenizer_max_length
            )
        ]
    else:  # Edit Plus reads a list of images as several references of each prompt: one pair at a time
        rows = [
            text_encoders.encode_prompt(
                prompt=[p], image=[r], device=device, max_sequence_length=config.tokenizer_max_length
            )
            for p, r in zip(prompts, references, strict=True)
        ]
    embeds = [e for e, _ in rows]
    masks = [m.long() if m is not None else torch.ones(e.shape[:2], dtype=torch.long, device=e.device) for e, m in rows]
    longest = max(e.shape[1] for e in embeds)
    embeds = torch.cat([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e in embeds])
    mask = torch.cat([torch.nn.functional.pad(m, (0, longest - m.shape[1])) for m in masks])
    return {"prompt_embeds": embeds, "attention_mask": mask}


@hookimpl
def reference_sizes(config: Any, width: int, height: int) -> dict[str, tuple[int, int]]:
    """The edit pipelines' calculate_dimensions: the reference's aspect at an area (sides rounded
    to 32) of ``reference_pixels`` (theirs: 1024 x 1024) for the VAE; the vision-language encoder
    sees the same image (Edit) or one of 384 x 384 area (Edit Plus, 2509)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE

    vae = calculate_dimensions(config.reference_pixels, width / height)[:2]
    if pipeline_name(config) == "QwenImageEditPlusPipeline":
        return {"vae": vae, "encoder": calculate_dimensions(CONDITION_IMAGE_SIZE, width / height)[:2]}
    return {"vae": vae, "encoder": vae}


@hookimpl
def example_text(config: Any, transformer: Any, batch_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tokens, width = config.tokenizer_max_length, transformer.config.joint_attention_dim
    text = {
        "prompt_embeds": torch.zeros(batch_size, tokens, width, dtype=dtype),
        "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long),
    }
    if is_edit(config):  # a square reference at reference_pixels rides along (its tokens cost memory)
        side = reference_sizes(config, 1, 1)["vae"][0] // 8
        text["reference_latents"] = torch.zeros(batch_size, transformer.config.out_channels, side, side, dtype=dtype)
    return text


def latent_statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(like)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(like)
    return mean, std


@hookimpl
def encode_images(vae: Any, pixels: torch.Tensor, config: Any) -> torch.Tensor:
    """As the edit pipelines encode reference images: one frame through the 3D VAE, the latent mode,
    normalised by the VAE's per-channel ``latents_mean``/``latents_std``; [B, 16, H/8, W/8]."""
    latents = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()[:, :, 0]
    mean, std = latent_statistics(vae, latents)
    return (latents - mean) / std


@hookimpl
def example_vae_latents(vae: Any, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    downscale = 2 ** len(vae.config.temperal_downsample)
    return torch.zeros(1, vae.config.z_dim, 1, height // downscale, width // downscale, dtype=dtype)


@hookimpl
def sample_sigmas(config: Any, batch_size: int, latent_shape: tuple[int, ...], generator: torch.Generator):
    """``sigma_sampling``'s draw (the family's: logit-normal) shifted by exp(mu), mu from
    calculate_shift with the model's scheduler constants (Qwen-Image: 256..8192 tokens, 0.5..0.9),
    as the pipelines shift (``flow_schedule_auto_shift``, on by default); else ``flow_schedule_shift``."""
    constants = _model_file(config, "scheduler/scheduler_config.json")
    return flow.sample_shifted_logit_normal(config, batch_size, latent_shape, generator, constants)


def text_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """None when every token counts, as the pipelines pass it (attention without a mask); the
    estimate's fake tensors have no values and keep the mask (the costlier path)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return mask if isinstance(mask, FakeTensor) or not bool(mask.all()) else None


@hookimpl
def predict_flow(transformer, noisy_latents, sigmas, text, config, generator) -> torch.Tensor:
    """The packed latents (an edit's reference latents packed after them, as the edit pipelines
    concatenate them), the text with its mask, sigma as the timestep; the prediction's first
    tokens are the target's."""
    b, _, h, w = noisy_latents.shape
    dtype = noisy_latents.dtype
    hidden = flow.pack_patches(noisy_latents)
    shapes = [(1, h // 2, w // 2)]
    reference = text.get("reference_latents")
    if reference is not None:
        rh, rw = reference.shape[-2:]
        hidden = torch.cat([hidden, flow.pack_patches(reference.to(dtype))], dim=1)
        shapes.append((1, rh // 2, rw // 2))
    prediction = transformer(
        hidden_states=hidden,
        encoder_hidden_states=text["prompt_embeds"].to(dtype),
        encoder_hidden_states_mask=text_mask(text["attention_mask"]),
        timestep=sigmas.to(dtype),
        img_shapes=[shapes] * b,
        return_dict=False,
    )[0]
    return flow.unpack_patches(prediction[:, : (h // 2) * (w // 2)], h, w)


@hookimpl
def generate_images(request: Any) -> list[Any]:
    """The model's pipeline with the cached embeddings and masks, real CFG (``validation_guidance``
    as true_cfg_scale) against the negative prompt; an edit model from ``validation_reference_image``
    (the pipeline sizes and encodes it itself)."""
    import diffusers

    config = request.config
    name = pipeline_name(config)
    shared: dict[str, Any] = {"true_cfg_scale": config.validation_guidance}
    if name in EDIT_PIPELINES:
        if request.reference is None:
            raise PluginError(f"{name} validates edits: set validation_reference_image (the image to edit)")
        shared["image"] = request.reference
    pipe = partial_pipeline(
        getattr(diffusers, name), scheduler=request.scheduler, vae=request.vae, transformer=request.transformer
    )
    if request.negative_text is not None:
        shared["negative_prompt_embeds"] = request.negative_text["prompt_embeds"]
        shared["negative_prompt_embeds_mask"] = request.negative_text["attention_mask"]

    def per_prompt(text: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"prompt_embeds": text["prompt_embeds"], "prompt_embeds_mask": text["attention_mask"]}

    return render(pipe, request, per_prompt, **shared)
