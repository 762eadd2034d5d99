"""`tuner configure`: ask for the central settings and write a config that `tuner run` accepts.

The questions come from the config keys themselves (every key registered with ``ask=True``, the
core's and the chosen family's), so a plugin's keys appear without changes here. Each answer is
checked like a config file value; a bad one is asked again with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuner.core.config.build import build_config
from tuner.core.config.keys import ASKED as ORDER  # the core's questions first, in this order
from tuner.core.config.values import check_value
from tuner.core.errors import ConfigError


def _parse(text: str, kind: str) -> Any:
    import yaml

    if kind in ("str", "path"):
        return text
    if kind == "str_list":
        return [part.strip() for part in text.split(";") if part.strip()]
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def run_wizard(
    family: str | None,
    ask: Callable[[str, str], str],
    say: Callable[[str], None],
    use_defaults: bool,
    given: dict[str, str] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Returns (host, settings). ``ask(question, default)`` returns the answer text; ``given``
    answers (from command-line options) are taken as defaults, so ``use_defaults`` takes them too."""
    given = given or {}
    from tuner.core.host.manager import PluginHost

    catalogue = PluginHost()
    families = sorted(catalogue.families)
    while family not in families:
        answer = family if use_defaults and family else ask(f"model family ({', '.join(families)})", families[0])
        if answer in families:
            family = answer
        elif use_defaults:
            raise ConfigError(f"unknown model family {answer!r}; installed families: {', '.join(families)}")
        else:
            say(f"  {answer!r} is not installed; choose one of {', '.join(families)}")
    host = PluginHost(family)
    host.family_info(family)
    keys = host.config_keys()
    asked = sorted(
        (k for k in keys.values() if k.ask),
        key=lambda k: (ORDER.index(k.name) if k.name in ORDER else len(ORDER), k.name),
    )
    settings: dict[str, Any] = {"model_type": "lora", "model_family": family}
    for key in asked:
        default, choices = host.choices(key)
        shown = "; ".join(default) if isinstance(default, list) else ("" if default is None else str(default))
        shown = given.get(key.name, shown)
        hint = f" [{'|'.join(choices)}]" if choices else (" (separate with ;)" if key.kind == "str_list" else "")
        while True:
            text = shown if use_defaults else ask(f"{key.name}{hint}: {key.help}", shown)
            if text == "" and default is None:
                if use_defaults or key.nullable or key.name != "data_dir":
                    break
                say("  data_dir is required: a folder of images with .txt captions")
                continue
            value = _parse(text, key.kind)
            try:
                if choices and value not in choices:
                    raise ConfigError(f"{key.name}: {value!r} is not one of {', '.join(choices)}")
                value = check_value(key, value, "answer")
            except ConfigError as exc:
                if use_defaults:
                    raise
                say(f"  {str(exc).removeprefix('answer: ')}; try again")
                continue
            if value != key.default or key.name in ("model_flavour", "data_dir"):
                settings[key.name] = value
            break
    return host, settings


def default_family() -> str:
    """The family ``--defaults`` takes without ``--plugin``: Chroma when installed, else the first."""
    from tuner.core.host.manager import PluginHost

    families = sorted(PluginHost().families)
    if not families:
        raise ConfigError("no model family is installed; install one (tuner plugins lists what is there)")
    return "chroma" if "chroma" in families else families[0]


def write_config(
    host: Any, settings: dict[str, Any], path: Path, source: str | None = None, origin: str = "`tuner configure`"
) -> Path:
    """Validate the settings as a run would (errors name ``source``: where they came from), then
    write them as YAML with a header saying what wrote them."""
    import yaml

    from tuner.core.io import atomic_write

    build_config(host, settings, source or str(path), warn=lambda m: None)
    text = f"# written by {origin}; run it with: tuner run --config {path}\n"
    text += yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
