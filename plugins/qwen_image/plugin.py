"""Qwen-Image's manifest: the family, its config keys. Import-cheap; the hooks that load, encode,
predict and render live in ``tuner.plugins.qwen_image.model``.

Qwen-Image (20B MMDiT, 60 dual-stream blocks) reads Qwen2.5-VL-7B's last hidden state through a
prompt template, and the 16-channel latents of a 3D (video-style) VAE in 2x2 patches. Qwen-Image-Edit
is the same model fed a reference image twice: through the vision-language encoder with the
instruction, and as latents beside the noisy ones. docs/qwen-image.md has the semantics and their
sources (diffusers' pipeline_qwenimage.py and pipeline_qwenimage_edit(_plus).py)."""

from __future__ import annotations

from tuner.core.api import ConfigKey, FamilyInfo, manifest_hooks
from tuner.plugins.qwen_image.formats import COMFYUI

ATTENTION = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
MLP = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]
MODULATION = ["img_mod.1", "txt_mod.1"]  # per block: each block's own shift/scale/gate
EMBEDDERS = ["img_in", "txt_in", "proj_out", "norm_out.linear"]
PRESETS = {
    "attention": ATTENTION,
    "attention+mlp": ATTENTION + MLP,
    "all-linear": ATTENTION + MLP + MODULATION + EMBEDDERS,
}
EDIT_PIPELINES = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")

FAMILY = FamilyInfo(
    name="qwen_image",
    description="Qwen-Image (20B, Qwen2.5-VL text encoder) and Qwen-Image-Edit (reference + instruction)",
    flavours={
        "base": "Qwen/Qwen-Image",
        "edit": "Qwen/Qwen-Image-Edit",
        "edit-2509": "Qwen/Qwen-Image-Edit-2509",
    },
    default_flavour="base",
    transformer_class="diffusers.QwenImageTransformer2DModel",
    vae_class="diffusers.AutoencoderKLQwenImage",
    scheduler_class="diffusers.FlowMatchEulerDiscreteScheduler",
    pipeline_class="diffusers.QwenImagePipeline",  # its LoRA loader (QwenImageLoraLoaderMixin) is the edits' too
    other_pipeline_classes=tuple(f"diffusers.{name}" for name in EDIT_PIPELINES),
    # ComfyUI 0.3 maps each weight's diffusers name (X, transformer.X) for QwenImage: one file serves
    # both, with alpha/rank folded into lora_B (diffusers' Qwen loader converts a file with .alpha
    # tensors as another trainer's; ComfyUI ignores metadata)
    comfyui_reads_diffusers_files=True,
    lora_alpha_in="folded",
    text_encoders=("text_encoder",),
    required_text_keys=("prompt_embeds", "attention_mask"),
    text_cache_keys=("tokenizer_max_length", "reference_pixels"),
    text_encoding="qwen-image-pipeline-encode-prompt-v1",
    text_lengths_vary=True,  # the pipelines cut each prompt's padding and pad a batch to its longest
    unused_weights=True,  # the last block's text queries, text out projection and text MLP feed nothing
    lora_target_key="qwen_image_lora_target",
    lora_presets=PRESETS,
    high_precision=("img_in", "txt_in", "txt_norm", "proj_out", "norm_out", "time_text_embed"),
    supports=("edit",),
    # the pipelines shift by image size (calculate_shift with the scheduler's constants); so does training
    defaults={"flow_schedule_auto_shift": True},
    implementation="tuner.plugins.qwen_image.model",
)

KEYS = (
    ConfigKey(
        "qwen_image_lora_target",
        "str_or_list",
        "attention+mlp",
        "LoRA targets: attention, attention+mlp or all-linear, or a list of module names.",
        choices=tuple(PRESETS),
        ask=True,
        resume_critical=True,
        group="LoRA",
    ),
    ConfigKey(
        "tokenizer_max_length",
        "int",
        512,
        "Text tokens per caption after the prompt template (the pipelines' max_sequence_length, 512; at most 1024).",
        minimum=1,
        maximum=1024,
        recipe=True,
    ),
    ConfigKey(
        "reference_pixels",
        "int",
        1024 * 1024,
        "Edit pairs: the area a reference image is resized to (aspect kept, sides multiples of 32) for the VAE, "
        "and for Qwen-Image-Edit's vision-language encoder too (Edit-2509 shows it at 384 x 384). The "
        "pipelines' 1024 x 1024; less trains cheaper, validation keeps the pipeline's.",
        minimum=32 * 32,
        recipe=True,
    ),
    ConfigKey(
        "validation_guidance",
        "float",
        4.0,
        "Real CFG scale at validation (true_cfg_scale), against validation_negative_prompt; 1 turns it off.",
        minimum=0,
        recipe=True,
        group="validation",
    ),
)


register_families, register_config_keys, register_lora_formats = manifest_hooks(FAMILY, KEYS, [COMFYUI])
