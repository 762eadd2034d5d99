"""The register hooks of a family's entry point, from the records it declares: a family plugin's
manifest is then data plus one line. Import-cheap, like the entry points."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tuner.core import hookimpl


def manifest_hooks(
    family: Any, keys: Iterable[Any] = (), formats: Iterable[Any] = ()
) -> tuple[Callable[..., None], ...]:
    """``register_families``, ``register_config_keys`` and ``register_lora_formats`` for a module::

    register_families, register_config_keys, register_lora_formats = manifest_hooks(FAMILY, KEYS, [COMFYUI])
    """
    keys, formats = tuple(keys), tuple(formats)

    @hookimpl
    def register_families(register):
        register(family)

    @hookimpl
    def register_config_keys(register):
        for key in keys:
            register(key)

    @hookimpl
    def register_lora_formats(register):
        for lora_format in formats:
            register(lora_format)

    return register_families, register_config_keys, register_lora_formats
