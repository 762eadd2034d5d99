"""Building a run's config: the checks every command makes on its settings, in one place, so
``tuner estimate``, ``tuner configure`` and ``tuner run`` accept and refuse the same configs."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tuner.core.config.datasets import resolve
from tuner.core.config.keys.model import NO_QUANTIZATION
from tuner.core.config.keys.optimization import optimizer_options
from tuner.core.config.keys.saving import trackers
from tuner.core.config.values import Config, validate
from tuner.core.errors import ConfigError, warn_user

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.host.manager import PluginHost


def build_config(
    host: PluginHost,
    raw: Mapping[str, Any],
    source: str,
    warn: Any = None,
    origins: Mapping[str, str] | None = None,
) -> Config:
    """Validate ``raw`` for the host's family: every check a run makes on its settings happens here,
    so ``tuner estimate``, ``tuner configure`` and ``tuner run`` accept and refuse the same configs.

    Keys and kinds, the family and flavour, keys the family ignores or refuses, the precision, the
    LoRA formats, the device the precision needs, then every plugin's ``check_config``."""
    warn = warn or warn_user
    family = host.family
    named = raw.get("model_family")
    if family is not None and isinstance(named, str) and named != family.name and named in host.families:
        # said before its keys are read: another family's keys would otherwise be refused one by one
        where = (origins or {}).get("model_family", source)
        raise ConfigError(f"{where}: model_family: this config is for {named}, not {family.name}; use --plugin {named}")
    keys = {  # the registered adapter types are checked with every other value, all errors at once
        name: replace(key, choices=host.choices(key)[1]) if key.choices_from == "adapter_types" else key
        for name, key in host.config_keys().items()
    }
    config = validate(raw, keys, source, origins)
    _check_adapter(config, host, warn)
    if family is not None:
        if config.model_family not in (None, family.name):
            raise config.error(
                "model_family", f"{config.model_family!r} contradicts --plugin {family.name}; drop one of them"
            )
        config.set_resolved("model_family", family.name)
        flavour = config.model_flavour or family.default_flavour
        if flavour not in family.flavours:
            raise config.error(
                "model_flavour",
                f"unknown flavour {flavour!r} for {family.name}; choose one of {', '.join(family.flavours)}",
            )
        config.set_resolved("model_flavour", flavour)
        _apply_family_defaults(config, family)
        _check_family_support(config, family, warn)
        for view in (config, *(dataset.config for dataset in resolve(config))):
            if view.aspect_bucket_alignment % family.latent_alignment:
                raise view.error(
                    "aspect_bucket_alignment",
                    f"{view.aspect_bucket_alignment} is not a multiple of {family.name}'s latent alignment "
                    f"{family.latent_alignment}; use {family.latent_alignment}, 32 or 64",
                )
        config.set_resolved("lora_format", _lora_formats(config, host))
        left_out = [f for f in host.lora_formats if f not in config.lora_format]
        if left_out and isinstance(raw.get("lora_format"), str) and raw.get("lora_format") in ALL_FORMATS:
            warn(
                f"{source}: lora_format {raw['lora_format']}: {', '.join(left_out)} cannot store lora_type "
                f"{config.lora_type}; writing {', '.join(config.lora_format)}"
            )
    for key in (name for name, declared in config.keys.items() if declared.choices_from == "precisions"):
        precision = config.get(key, NO_QUANTIZATION)
        if precision != NO_QUANTIZATION and precision not in host.precisions:
            known = ", ".join([NO_QUANTIZATION, *sorted(host.precisions)])
            raise config.error(key, f"unknown precision {precision!r}; choose one of {known}")
    _check_optimizer(config, host, warn)
    if config.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise config.error("mixed_precision", "fp16 needs a CUDA GPU; use bf16 or no")
    _check_trackers(config, host, warn)
    host.check_config(config, warn)
    return config


def _check_adapter(config: Config, host: PluginHost, warn: Any) -> None:
    """Keys the run's adapter type does not read are said to be ignored."""
    if "lora_type" not in config:
        return
    adapter = host.adapter_types[config.lora_type]  # a registered name: validate checked the choices
    others = {key for info in host.adapter_types.values() if info is not adapter for key in info.own_keys}
    for key in sorted(others - set(adapter.own_keys)):
        if config.is_set(key):
            warn(f"{config.source}: {key} is ignored because lora_type is {adapter.name}")
    if not adapter.dropout and config.is_set("lora_dropout") and config.lora_dropout:
        warn(f"{config.source}: lora_dropout is ignored by lora_type {adapter.name} (peft's {adapter.name} has none)")


def _check_optimizer(config: Config, host: PluginHost, warn: Any) -> None:
    """``optimizer`` names a registered optimizer whose library is installed; ``optimizer_config`` parses."""
    if "optimizer" not in config:
        return
    info = host.optimizers.get(config.optimizer)
    if info is None:
        known = ", ".join(sorted(host.optimizers))
        close = difflib.get_close_matches(config.optimizer, list(host.optimizers), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise config.error("optimizer", f"unknown optimizer {config.optimizer!r}{hint}; registered: {known}")
    import importlib.util

    lacking = [m for m in info.requires if importlib.util.find_spec(m) is None]
    if lacking:
        raise config.error(
            "optimizer", f"{info.name} needs {', '.join(lacking)}, which is not installed; {info.install_hint}"
        )
    optimizer_options(config)  # a malformed optimizer_config is refused before anything loads
    if info.check is not None:  # what the optimizer itself says of these settings
        info.check(config, warn)


def _check_trackers(config: Config, host: PluginHost, warn: Any) -> None:
    """``report_to`` names a tracker nothing provides: say so (a run would report nowhere silently)."""
    installed = {record.name for record in host.records if not record.error and not record.disabled}
    for name in trackers(config):
        if name != "tensorboard" and name not in installed:
            warn(
                f"{config.source}: report_to: no installed plugin is named {name!r}, so nothing is reported "
                f"there; install a tracker plugin registered as {name!r} (or use tensorboard or none)"
            )


def _apply_family_defaults(config: Config, family: Any) -> None:
    """The family's values (``FamilyInfo.defaults``) for keys the config leaves unset."""
    from tuner.core.errors import PluginError

    unknown = [key for key in (*family.defaults, family.lora_target_key) if key and key not in config.keys]
    if unknown:
        raise PluginError(
            f"model family {family.name} ({family.plugin}) names config key {unknown[0]!r}, which no plugin offers"
        )
    for key, value in family.defaults.items():
        config.set_default(key, value)


def _check_family_support(config: Config, family: Any, warn: Any) -> None:
    """Refuse keys the family cannot honour; warn about keys it ignores (only when the user set them)."""
    for name, key in config.keys.items():
        if not config.is_set(name):
            continue
        why = family.refusal(key)
        if why is not None and config[name] != key.default:
            raise config.error(name, f"{why}; remove the key")
        if name in family.ignored_keys:
            warn(f"{config.source}: {name} is ignored by {family.name}: {family.ignored_keys[name]}")


# lora_format values that mean every format the run's plugins registered
ALL_FORMATS = ("all", "both")


def _lora_formats(config: Config, host: PluginHost) -> list[str]:
    """``lora_format`` as the list of registered format names it stands for."""
    value = config.lora_format
    known = list(host.lora_formats)  # in registration order: the core's diffusers first
    kind = config.get("lora_type", "lora")
    layout = host.adapter_types[kind].layout if kind in host.adapter_types else "lora"
    if value in ALL_FORMATS:
        if value == "both" and len(known) != 2:
            raise config.error(
                "lora_format", f"'both' means two formats, but {host.family.name} writes {', '.join(known)}; use all"
            )
        return [f for f in known if layout in host.lora_formats[f].layouts]
    wanted = [value] if isinstance(value, str) else list(value)
    unknown = [f for f in wanted if f not in known]
    if unknown or not wanted:
        raise config.error(
            "lora_format",
            f"{', '.join(map(repr, unknown)) or 'an empty list'}: choose from {', '.join(known)}, or all",
        )
    for name in wanted:
        if layout not in host.lora_formats[name].layouts:
            able = [f for f in known if layout in host.lora_formats[f].layouts]
            holds = [n for n, info in host.adapter_types.items() if info.layout in host.lora_formats[name].layouts]
            raise config.error(
                "lora_format",
                f"{name} cannot store lora_type {kind} (it holds {', '.join(holds)}); use {' or '.join(able)}",
            )
    return list(dict.fromkeys(wanted))
