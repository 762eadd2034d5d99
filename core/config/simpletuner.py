"""Reading a SimpleTuner ``config.json`` and its ``multidatabackend.json``.

Keys tuner understands are mapped (most have the same name; SimpleTuner's aliases are tuner's
aliases), keys that change nothing tuner does are listed as ignored, and keys whose meaning tuner
cannot honour are refused with the reason. ``tuner run --config config.json`` converts on the
fly; ``tuner convert-config`` writes the equivalent tuner config to move over for good.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuner.core.config.values import read_config_file
from tuner.core.errors import ConfigError

# SimpleTuner keys that do not change what tuner does (logging, hub, UI, speed knobs it decides itself)
IGNORED = {
    "tracker_project_name",
    "tracker_run_name",
    "push_to_hub",
    "hub_model_id",
    "push_checkpoints_to_hub",
    "validation_torch_compile",
    "disable_benchmark",
    "aspect_bucket_rounding",
    "webhook_config",
    "model_card_safe_for_work",
    "num_validation_images",
    "validation_guidance_rescale",
    "allow_tf32",
    "disable_tf32",
    "vae_batch_size",
    "write_batch_size",
    "text_encoder_batch_size",
    "compress_disk_cache",
    "delete_problematic_images",
    "metadata_update_interval",
    "lora_init_type",
    "init_lora",
    "validation_resolution_type",
    "maximum_image_size",
    "target_downsample_size",
    "logging_dir",
    "validation_num_video_frames",
    "override_dataset_config",
    "user_prompt_library",
    "enable_xformers_memory_efficient_attention",
    "attention_mechanism",
    # FSDP details tuner decides itself (fully_shard per transformer block, DCP checkpoints); fsdp_enable,
    # fsdp_reshard_after_forward and fsdp_cpu_ram_efficient_loading carry over
    "fsdp_version",
    "fsdp_state_dict_type",
    "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_auto_wrap_policy",
    "fsdp_limit_all_gathers",
}
# values tuner cannot honour, with the reason
UNSUPPORTED = {
    "lr_scheduler": (
        lambda v: (
            v not in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
        ),
        "tuner offers constant, constant_with_warmup, linear, cosine, cosine_with_restarts and polynomial, "
        "not {value!r}",
    ),
    "snr_gamma": (lambda v: v is not None, "tuner does not weight the loss by SNR (got {value!r})"),
}
BACKEND_KEYS = {
    "id",
    "type",
    "dataset_type",
    "instance_data_dir",
    "caption_strategy",
    "resolution",
    "resolution_type",
    "crop",
    "crop_style",
    "crop_aspect",
    "repeats",
    "cache_dir_vae",
    "cache_dir",
    "disabled",
    "default",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "metadata_backend",
    "probability",
    "is_regularisation_data",
    "caption_dropout_probability",
    "skip_file_discovery",
    "prepend_instance_prompt",
    "instance_prompt",
    "only_instance_prompt",
    "conditioning_data",
}


# SimpleTuner keys whose value tuner replaces with its own way, and what it does instead
REPLACED = {
    "scheduled_sampling_sampler": (
        lambda v: v != "euler",
        "scheduled_sampling_sampler {value!r}: tuner's rollouts take Euler steps on the family's inference schedule",
    ),
    "scheduled_sampling_order": (lambda v: True, None),  # the solver order of the samplers above
    "scheduled_sampling_reflexflow": (lambda v: True, None),  # said below when SimpleTuner would apply it
    "ema_validation": (
        lambda v: v not in ("none", "ema_only"),
        "ema_validation {value!r}: tuner renders validation with one set of weights (validation_use_ema: true for "
        "the EMA's)",
    ),
}

# SimpleTuner's optimizer names -> tuner's registered ones (the same algorithm)
OPTIMIZERS = {
    "adamw": "adamw",
    "adamw_torch": "adamw",
    "adamw_bf16": "adamw",
    "optimi-adamw": "adamw",
    "bnb-adamw": "adamw",
    "adamw8bit": "adamw8bit",
    "bnb-adamw8bit": "adamw8bit",
    "bnb-adamw8bit-paged": "adamw8bit",
    "ao-adamw8bit": "adamw8bit",
    "adafactor": "adafactor",
    "prodigy": "prodigy",
    "optimi-lion": "lion",
    "bnb-lion": "lion",
}


def optimizer_name(value: Any) -> tuple[Any, str | None]:
    """tuner's name for a SimpleTuner optimizer, and a note when the two differ in more than the name."""
    name = OPTIMIZERS.get(value, value)
    if value == "adamw_bf16":
        return name, "optimizer 'adamw_bf16': tuner's adamw keeps the adapter and its state in fp32 (same algorithm)"
    if value not in OPTIMIZERS:
        return name, (
            f"optimizer {value!r}: not one of tuner's; a run accepts it only when an installed plugin registers it "
            "(`tuner plugins` lists the optimizers)"
        )
    if name == "lion":
        return name, f"optimizer {value!r}: lion is offered by a plugin (examples/tuner-lion), not by tuner itself"
    return name, None


def is_simpletuner(raw: dict[str, Any]) -> bool:
    return any(k.startswith("--") for k in raw) or "data_backend_config" in raw


def convert(path: Path, raw: dict[str, Any], known: set[str]) -> tuple[dict[str, Any], list[str]]:
    """(tuner settings, notes). ``known``: every key and alias tuner accepts for the family."""
    settings: dict[str, Any] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    refused: list[str] = []
    notes: list[str] = []
    for given, value in raw.items():
        key = given.lstrip("-")
        if key in UNSUPPORTED:
            refuse, reason = UNSUPPORTED[key]
            if refuse(value):
                refused.append(f"{key}: " + reason.format(value=value))
            elif key == "lr_scheduler":
                settings[key] = value
            continue
        if key in REPLACED or key.startswith("scheduled_sampling_reflexflow_"):
            noted, note = REPLACED.get(key, (lambda v: False, None))
            if noted(value) and note:
                notes.append(note.format(value=value))
            if key == "ema_validation" and value == "ema_only":
                settings["validation_use_ema"] = True
            continue
        if key in ("lora_type", "lycoris_config", "use_dora"):
            continue  # read together below
        if key == "optimizer":
            settings[key], note = optimizer_name(value)
            if note:
                notes.append(note)
            continue
        if key == "data_backend_config":
            settings.update(_backends(path.parent, Path(value), raw))
        elif key in known:
            settings[key] = value
        elif key in IGNORED:
            ignored.append(key)
        else:
            unknown.append(key)
    given = {k.lstrip("-"): v for k, v in raw.items()}
    try:
        settings.update(adapter_settings(path.parent, given, notes))
    except ConfigError as exc:
        refused.append(str(exc))
    reflexflow = given.get("scheduled_sampling_reflexflow")
    if (settings.get("scheduled_sampling_max_step_offset") or 0) > 0 and reflexflow is not False:
        notes.append(
            "scheduled_sampling_reflexflow: tuner applies no ReflexFlow terms (SimpleTuner turns them on with "
            "rollouts unless set false); its target leads a rolled-out latent back to the clean image instead"
        )
    if refused:  # every key tuner cannot honour, at once
        raise ConfigError(f"{path}: cannot convert {len(refused)} key(s): " + "; ".join(refused))
    if settings.pop("_cache_note", None):
        notes.append(
            f"cache_dir_vae: tuner keeps latents and text embeddings in one cache_dir ({settings['cache_dir']}), "
            "in its own layout; SimpleTuner's caches are not reused"
        )
    if ignored:
        notes.append(f"ignored SimpleTuner key(s) with no effect in tuner: {', '.join(sorted(ignored))}")
    if unknown:
        notes.append(
            f"ignored SimpleTuner key(s) tuner does not know; check they do not matter: {', '.join(sorted(unknown))}"
        )
    return settings, notes


# LyCORIS algorithms tuner trains (peft's LoKr and LoHa), by the name lycoris_config gives
LYCORIS_ALGOS = {"lokr": "lokr", "loha": "loha"}
FULL_LYCORIS_DIM = 10000  # LyCORIS' "no decomposition": whole factor matrices, scale 1


def adapter_settings(base: Path, given: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """``lora_type`` (standard / lycoris with its ``lycoris_config`` JSON) and ``use_dora`` as tuner's
    ``lora_type`` and its keys."""
    kind = given.get("lora_type", "standard")
    if kind == "standard":
        return {"lora_type": "dora"} if given.get("use_dora") else {}
    if kind != "lycoris":
        raise ConfigError(f"lora_type: tuner trains standard (peft) LoRA, DoRA and LyCORIS LoKr/LoHa, not {kind!r}")
    if not given.get("lycoris_config"):
        raise ConfigError("lora_type: lycoris needs lycoris_config (a JSON file with algo lokr or loha)")
    config_path = Path(given["lycoris_config"])
    config_path = config_path if config_path.is_absolute() else base / config_path
    try:
        lycoris = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"lycoris_config: cannot read {config_path}: {exc}") from None
    algo = lycoris.get("algo")
    if algo not in LYCORIS_ALGOS:
        raise ConfigError(f"lycoris_config: algo {algo!r} in {config_path}; tuner trains {', '.join(LYCORIS_ALGOS)}")
    settings: dict[str, Any] = {"lora_type": LYCORIS_ALGOS[algo]}
    dim, alpha = lycoris.get("linear_dim"), lycoris.get("linear_alpha")
    if dim is not None:
        settings["network_rank"] = int(dim)
        settings["lora_alpha"] = float(dim if dim >= FULL_LYCORIS_DIM else (alpha if alpha is not None else dim))
        if dim >= FULL_LYCORIS_DIM:
            notes.append(
                f"lycoris_config: linear_dim {dim} means whole LoKr factors in LyCORIS, which scales them by 1: "
                "lora_alpha is set to the rank to match"
            )
    if "factor" in lycoris and algo == "lokr":
        settings["lokr_factor"] = int(lycoris["factor"])
    left = sorted(set(lycoris) - {"algo", "linear_dim", "linear_alpha", "factor", "multiplier"})
    if left:
        notes.append(
            f"lycoris_config: {', '.join(left)} not carried over (tuner adapts the flux_lora_target preset's layers)"
        )
    return settings


def _backends(base: Path, backend_path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    path = (
        backend_path
        if backend_path.is_absolute()
        else (base / backend_path if (base / backend_path).exists() else backend_path)
    )
    try:
        backends = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"data_backend_config {path}: cannot read it ({exc})") from None
    images = [b for b in backends if b.get("dataset_type", "image") == "image" and not b.get("disabled")]
    if not images:
        raise ConfigError(f"{path}: no enabled image backend")
    entries = [_dataset(backend, f"{path}: backend {backend.get('id', '?')!r}") for backend in images]
    masks = {  # conditioning backends of masks, by id: the image backends naming them get mask_dir
        b.get("id"): b["instance_data_dir"]
        for b in backends
        if b.get("dataset_type") == "conditioning" and b.get("conditioning_type") == "mask" and not b.get("disabled")
    }
    for backend, entry in zip(images, entries, strict=True):
        linked = backend.get("conditioning_data")
        for name in [linked] if isinstance(linked, str) else linked or []:
            if name in masks:
                entry["mask_dir"] = masks[name]
    settings: dict[str, Any] = {}
    if len(entries) == 1:  # one backend: the short form, data_dir and the rest at the top level
        entry = entries[0]
        settings["data_dir"] = entry.pop("data_dir")
        settings["dataset_repeats"] = entry.pop("repeats")
        for own in ("id", "weight", "kind"):  # one dataset: nothing to weigh or tell apart
            entry.pop(own, None)
        settings.update(entry)
    else:
        settings["datasets"] = entries
    text_cache = next((b for b in backends if b.get("dataset_type") == "text_embeds"), {})
    cache = text_cache.get("cache_dir") or images[0].get("cache_dir_vae")
    if cache:
        settings["cache_dir"] = str(Path(cache).parent) if text_cache.get("cache_dir") is None else cache
        settings["_cache_note"] = True
    return settings


def _dataset(backend: dict[str, Any], where: str) -> dict[str, Any]:
    """One SimpleTuner image backend as an entry of tuner's ``datasets``."""
    if backend.get("type", "local") != "local":
        raise ConfigError(f"{where}: type {backend['type']!r}; tuner reads local folders only")
    strategy = backend.get("caption_strategy", "filename")
    if strategy not in ("textfile", "filename", "instanceprompt"):
        raise ConfigError(
            f"{where}: caption_strategy {strategy!r}; tuner supports textfile, filename and instanceprompt"
        )
    prompt = backend.get("instance_prompt")
    if backend.get("only_instance_prompt"):
        strategy = "instanceprompt"
    if strategy == "instanceprompt" and not prompt:
        raise ConfigError(f"{where}: caption_strategy instanceprompt needs instance_prompt")
    unknown = sorted(set(backend) - BACKEND_KEYS)
    if unknown:
        raise ConfigError(f"{where}: key(s) {', '.join(unknown)} have no tuner equivalent")
    entry = {
        "id": str(backend.get("id", "dataset")),
        "data_dir": backend["instance_data_dir"],
        "caption_strategy": strategy,
        "repeats": int(backend.get("repeats", 0)),
        **_bucketing(backend, where),
    }
    if backend.get("probability") is not None:
        entry["weight"] = backend["probability"]
    if backend.get("is_regularisation_data"):
        entry["kind"] = "regularisation"
    entry.update({k: backend[k] for k in ("caption_dropout_probability",) if k in backend})
    if strategy == "instanceprompt":
        entry["instance_prompt"] = prompt
    elif backend.get("prepend_instance_prompt") and prompt:  # SimpleTuner's trigger word before each caption
        entry["caption_prefix"] = prompt
    return entry


def _bucketing(backend: dict[str, Any], where: str) -> dict[str, Any]:
    """SimpleTuner's sizing and cropping keys of a backend as tuner's bucket settings."""
    settings: dict[str, Any] = {}
    kind = backend.get("resolution_type", "pixel")
    if kind not in ("pixel", "pixel_area", "area"):
        raise ConfigError(f"{where}: resolution_type {kind!r}; tuner knows pixel, pixel_area and area")
    settings["resolution_type"] = "pixel" if kind == "pixel" else "area"

    def pixels(value: Any, key: str) -> int:  # `area` sizes are megapixels: the side of a square that big
        if not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}: {key} {value!r} is not a positive number")
        return round((value * 1e6) ** 0.5 / 16) * 16 if kind == "area" else int(value)

    if "resolution" in backend:
        settings["resolution"] = pixels(backend["resolution"], "resolution")
    if backend.get("minimum_image_size"):
        settings["minimum_image_size"] = pixels(backend["minimum_image_size"], "minimum_image_size")
    style = backend.get("crop_style", "center")
    if style not in ("center", "random"):  # tuner crops only the remainder after covering the bucket
        raise ConfigError(f"{where}: crop_style {style!r}; tuner crops center or random")
    settings["crop_style"] = style
    aspect = backend.get("crop_aspect", "square" if backend.get("crop") else "preserve")
    if aspect not in ("square", "preserve", "closest"):
        raise ConfigError(f"{where}: crop_aspect {aspect!r}; tuner buckets by each image's own aspect (preserve)")
    if aspect == "square":
        settings["aspect_bucket_max_ratio"] = 1.0
    return settings


def load(path: Path, host: Any) -> tuple[dict[str, Any], list[str]]:
    keys = host.config_keys()
    known = set(keys) | {alias for key in keys.values() for alias in key.aliases}
    return convert(Path(path), read_config_file(path), known)
