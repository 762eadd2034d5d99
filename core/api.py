"""The public API of tuner's core: everything a plugin (a model family, a quantization backend, an
optimizer, a tracker, the web UI) and a plugin's tests may use, in one module.

    from tuner.core.api import FamilyInfo, ConfigKey, hookimpl

Importing this module is cheap: each name is imported from the module that defines it the first
time it is used (PEP 562), so a plugin's hook module (its entry point) may import from here; heavy
names (``Trainer``, ``flow``, ``render``) are best imported inside the hooks that use them. Names not
listed here are internal and may move between releases; ``docs/architecture.md`` says where each
lives.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tuner.core import __version__, hookimpl, hookspec

# name -> (module, attribute), grouped as a plugin author meets them
_EXPORTS: dict[str, tuple[str, str]] = {
    # what plugins register (tuner.core.host.records) and the events observers receive
    **{
        name: ("tuner.core.host.records", name)
        for name in (
            "FamilyInfo",
            "PrecisionInfo",
            "OptimizerInfo",
            "AdapterInfo",
            "ConfigKey",
            "LoraFormat",
            "LoraExport",
            "LoraReading",
            "ValidationRequest",
            "KEY_GROUPS",
            "in_group",
        )
    },
    "manifest_hooks": ("tuner.core.host.manifest", "manifest_hooks"),
    **{
        name: ("tuner.core.host.events", name)
        for name in (
            "TrainEvent",
            "RunStart",
            "StepEnd",
            "Skip",
            "Rollback",
            "Validation",
            "Evaluation",
            "Save",
            "RunEnd",
        )
    },
    # errors the CLI prints as one line
    **{
        name: ("tuner.core.errors", name)
        for name in (
            "TunerError",
            "ConfigError",
            "PluginError",
            "DataError",
            "Interrupted",
            "Diverged",
            "first_line",
            "warn_user",
        )
    },
    # the plugin host and a run's config
    "PluginHost": ("tuner.core.host.manager", "PluginHost"),
    "Config": ("tuner.core.config.values", "Config"),
    "build_config": ("tuner.core.config.build", "build_config"),
    "read_config_file": ("tuner.core.config.values", "read_config_file"),
    "parse_overrides": ("tuner.core.config.values", "parse_overrides"),
    "model_source": ("tuner.core.config.values", "model_source"),
    "NO_QUANTIZATION": ("tuner.core.host.records", "NO_QUANTIZATION"),
    "CONFIGURE_ORDER": ("tuner.core.config.keys", "ASKED"),
    "resolve_datasets": ("tuner.core.config.datasets", "resolve"),
    "adam_settings": ("tuner.core.config.keys.optimization", "adam_settings"),
    # data
    "IMAGE_SUFFIXES": ("tuner.core.data.images", "IMAGE_SUFFIXES"),
    "image_files": ("tuner.core.data.images", "image_files"),
    "image_size": ("tuner.core.data.images", "image_size"),
    "read_caption": ("tuner.core.data.images", "read_caption"),
    "scan_dataset": ("tuner.core.data.images", "scan_dataset"),
    "caption_rule": ("tuner.core.data.images", "caption_rule"),
    "CaptionRule": ("tuner.core.data.images", "CaptionRule"),
    "unreadable_errors": ("tuner.core.data.images", "unreadable_errors"),
    "bucket_tables": ("tuner.core.data.cache", "bucket_tables"),
    "READ_ERRORS": ("tuner.core.fixes", "READ_ERRORS"),
    # the model side: flow-matching arithmetic, LoRA targets, pipelines, quantization helpers
    "flow": ("tuner.core.model.flow", ""),
    "resolve_targets": ("tuner.core.model.lora", "resolve_targets"),
    "diffusers_layout": ("tuner.core.model.lora", "diffusers_layout"),
    "base_weight": ("tuner.core.model.adapters", "base_weight"),
    "module_of": ("tuner.core.model.adapters", "module_of"),
    "is_lycoris": ("tuner.core.model.adapters", "is_lycoris"),
    "read_lycoris": ("tuner.core.model.adapters", "read_lycoris"),
    "partial_pipeline": ("tuner.core.model.pipelines", "partial_pipeline"),
    "Pretrained": ("tuner.core.model.pretrained", "Pretrained"),
    "load_component": ("tuner.core.model.pretrained", "load_component"),
    "render": ("tuner.core.model.pipelines", "render"),
    "plain_linears": ("tuner.core.model.quantize", "plain_linears"),
    "release_freed_memory": ("tuner.core.model.quantize", "release_freed_memory"),
    "cast_input_as_autocast": ("tuner.core.model.quantize", "cast_input_as_autocast"),
    "device_type": ("tuner.core.training.runtime", "device_type"),
    # runs, estimates and the files a run writes
    "Trainer": ("tuner.core.run.trainer", "Trainer"),
    "estimate": ("tuner.core.estimate.trace", "estimate"),
    "cached_estimate": ("tuner.core.estimate.cached", "cached_estimate"),
    "atomic_write": ("tuner.core.io", "atomic_write"),
    "CONFIG_FILE": ("tuner.core.outputs.runinfo", "CONFIG_FILE"),
    "RUN_FILE": ("tuner.core.outputs.runinfo", "RUN_FILE"),
    "read_run": ("tuner.core.outputs.runinfo", "read_run"),
    "duration": ("tuner.core.outputs.runinfo", "duration"),
    "process_alive": ("tuner.core.io", "process_alive"),
    "process_started": ("tuner.core.io", "process_started"),
}

__all__ = ["__version__", "hookimpl", "hookspec", *_EXPORTS]


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"tuner.core.api has no {name!r}; see __all__ for the public names") from None
    module = importlib.import_module(module_name)
    value = getattr(module, attribute) if attribute else module
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - what type checkers and editors see
    pass
