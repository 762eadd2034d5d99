"""Run configuration: YAML, JSON or JSON with comments, checked against the keys plugins offer.

Every error is one line naming the file and key (and the closest valid key for a typo).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.core.errors import ConfigError, warn_user
from tuner.core.types import ConfigKey

if TYPE_CHECKING:  # pragma: no cover
    from tuner.core.plugins import PluginHost

NO_QUANTIZATION = "no_change"


class Config:
    """Validated settings of one run. Read values as attributes: ``config.learning_rate``."""

    def __init__(self, values: dict[str, Any], keys: dict[str, ConfigKey], explicit: set[str], source: str):
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_explicit", explicit)
        object.__setattr__(self, "source", source)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"config has no key {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; use set_default() in check_config")

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def is_set(self, name: str) -> bool:
        """True when the user set the key (in the file or with --set), not just its default."""
        return name in self._explicit

    def set_default(self, name: str, value: Any) -> None:
        """Fill a derived value for a key the user left unset or set to null (for check_config hooks)."""
        if name not in self._explicit or self._values.get(name) is None:
            self._values[name] = value

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def kind(self, name: str) -> str:
        """The key's kind (``int``, ``path``, ...), or "" for a value no key declares."""
        key = self._keys.get(name)
        return key.kind if key else ""

    def derive(self, values: dict[str, Any], source: str | None = None) -> Config:
        """This config with ``values`` set as if the user had written them (a dataset's view of the
        run); errors from it name ``source`` (the entry) when given."""
        return Config({**self._values, **values}, self._keys, self._explicit | set(values), source or self.source)

    def flagged(self, flag: str) -> dict[str, Any]:
        """The values of every key whose ConfigKey sets ``flag`` (``resume_critical``, ``recipe``)."""
        return {name: self._values.get(name) for name, key in self._keys.items() if getattr(key, flag)}

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")


# -- reading files ------------------------------------------------------------------------------


def _strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments and trailing commas outside strings (JSONC, as the seed writes)."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
        elif c == '"':
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            # keep line numbers right for error messages
            chunk = text[i : (n if end < 0 else end + 2)]
            out.append("\n" * chunk.count("\n"))
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return re.sub(r",(\s*[}\]])", r"\1", "".join(out))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .yaml/.yml, .json or .jsonc file into a dict; one-line errors with line numbers."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonc"):
        try:
            data = json.loads(_strip_json_comments(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    else:
        raise ConfigError(f"config file {path}: unknown extension {suffix!r}; use .yaml, .yml, .json or .jsonc")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, not {type(data).__name__}")
    return data


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are read as YAML scalars (``true``, ``1e-4``, ``[a, b]``)."""
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        try:
            result[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            result[key] = raw
    return result


# -- checking -----------------------------------------------------------------------------------


def _check_value(key: ConfigKey, value: Any, where: str) -> Any:
    """Return the value coerced to the key's kind, or raise a one-line ConfigError."""
    name = key.name
    if value is None:
        if key.nullable or key.default is None:
            return None
        raise ConfigError(f"{where}: {name}: must not be null (default {key.default!r})")
    kind = key.kind
    want = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "a string",
        "path": "a path",
        "str_list": "a list of strings",
        "str_or_list": "a string or a list of strings",
        "sizes": "a size (512), WIDTHxHEIGHT (768x1344) or a list of them",
        "mappings": "a list of mappings",
    }[kind]
    bad = ConfigError(f"{where}: {name}: expected {want}, got {value!r}")
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        if int(value) != value:
            raise bad
        value = int(value)
    elif kind == "float":
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif kind in ("str", "path"):
        if isinstance(value, bool) and key.choices:  # YAML 1.1 reads an unquoted no/yes as a bool
            spelled = [c for c in key.choices if c in (("yes", "true", "on") if value else ("no", "false", "off"))]
            value = spelled[0] if spelled else value
        if not isinstance(value, str):
            raise bad
    elif kind == "str_list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
    elif kind == "str_or_list":
        if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise bad
    elif kind == "mappings":
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise bad
    elif kind == "sizes":
        value = _sizes(value, bad)
        for width, height in value:
            if min(width, height) < (key.minimum or 1) or (
                key.multiple_of and (width % key.multiple_of or height % key.multiple_of)
            ):
                raise ConfigError(
                    f"{where}: {name}: {width}x{height}: each side must be at least {key.minimum or 1:g}"
                    + (f" and a multiple of {key.multiple_of}" if key.multiple_of else "")
                )
        return value
    if key.choices is not None and isinstance(value, str) and value not in key.choices:
        close = difflib.get_close_matches(value, key.choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: {name}: {value!r} is not one of {', '.join(key.choices)}{hint}")
    if key.minimum is not None and isinstance(value, (int, float)) and value < key.minimum:
        raise ConfigError(f"{where}: {name}: must be at least {key.minimum:g}, got {value!r}")
    if key.maximum is not None and isinstance(value, (int, float)):
        if value >= key.maximum if key.maximum_exclusive else value > key.maximum:
            bound = f"below {key.maximum:g}" if key.maximum_exclusive else f"at most {key.maximum:g}"
            raise ConfigError(f"{where}: {name}: must be {bound}, got {value!r}")
    if key.multiple_of and isinstance(value, int) and value % key.multiple_of:
        raise ConfigError(f"{where}: {name}: must be a multiple of {key.multiple_of}, got {value}")
    problem = key.check(value) if key.check is not None else None
    if problem:
        raise ConfigError(f"{where}: {name}: {problem}")
    return value


def _sizes(value: Any, bad: ConfigError) -> list[list[int]]:
    """An int, "WxH", a comma-separated string or a list of those (or of ``[width, height]``), as
    ``[[width, height], ...]``."""
    if isinstance(value, str):
        value = [part for part in value.replace(" ", "").split(",") if part]
    values = value if isinstance(value, list) else [value]
    sizes = []
    for one in values:
        if isinstance(one, int) and not isinstance(one, bool):
            sizes.append([one, one])
        elif isinstance(one, str) and re.fullmatch(r"\d+[xX]\d+", one):
            width, height = one.lower().split("x")
            sizes.append([int(width), int(height)])
        elif isinstance(one, str) and one.isdigit():
            sizes.append([int(one), int(one)])
        elif isinstance(one, (list, tuple)) and len(one) == 2 and all(isinstance(v, int) for v in one):
            sizes.append([one[0], one[1]])  # [width, height], as configs and recipes store them
        else:
            raise bad
    if not sizes:
        raise bad
    return sizes


def validate(
    raw: Mapping[str, Any], keys: dict[str, ConfigKey], source: str, origins: Mapping[str, str] | None = None
) -> Config:
    """Resolve aliases, refuse unknown keys, check kinds and fill defaults.

    ``origins`` names where a key came from when not the file (``--set``), for error messages."""
    origins = origins or {}
    alias_of = {alias: k.name for k in keys.values() for alias in k.aliases}
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for given, value in raw.items():
        name = alias_of.get(given, given)
        where = origins.get(given, source)
        if name not in keys:
            close = difflib.get_close_matches(given, list(keys) + list(alias_of), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; `tuner keys --plugin NAME` lists them"
            raise ConfigError(f"{where}: unknown key {given!r}{hint}")
        if name in given_as:
            raise ConfigError(f"{where}: {given_as[name]!r} and {given!r} are the same key ({name}); keep one")
        values[name] = _check_value(keys[name], value, where)
        given_as[name] = given
    for name, key in keys.items():
        if name not in values:
            values[name] = list(key.default) if isinstance(key.default, (list, tuple)) else key.default
    return Config(values, keys, set(given_as), source)


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
    config = validate(raw, host.config_keys(), source, origins)
    if family is not None:
        if config.model_family not in (None, family.name):
            raise config.error(
                "model_family", f"{config.model_family!r} contradicts --plugin {family.name}; drop one of them"
            )
        config._values["model_family"] = family.name
        flavour = config.model_flavour or family.default_flavour
        if flavour not in family.flavours:
            raise config.error(
                "model_flavour",
                f"unknown flavour {flavour!r} for {family.name}; choose one of {', '.join(family.flavours)}",
            )
        config._values["model_flavour"] = flavour
        _check_family_support(config, family, warn)
        from tuner.core.datasets import resolve

        for view in (config, *(dataset.config for dataset in resolve(config))):
            if view.aspect_bucket_alignment % family.latent_alignment:
                raise view.error(
                    "aspect_bucket_alignment",
                    f"{view.aspect_bucket_alignment} is not a multiple of {family.name}'s latent alignment "
                    f"{family.latent_alignment}; use {family.latent_alignment}, 32 or 64",
                )
        config._values["lora_format"] = _lora_formats(config, host)
        left_out = [f for f in host.lora_formats if f not in config.lora_format]
        if left_out and isinstance(raw.get("lora_format"), str) and raw.get("lora_format") in ALL_FORMATS:
            warn(
                f"{source}: lora_format {raw['lora_format']}: {', '.join(left_out)} cannot store lora_type "
                f"{config.lora_type}; writing {', '.join(config.lora_format)}"
            )
    from tuner.core.builtin import TEXT_ENCODER_PRECISIONS

    for key in ("base_model_precision", *TEXT_ENCODER_PRECISIONS):
        precision = config.get(key, NO_QUANTIZATION)
        if precision != NO_QUANTIZATION and precision not in host.precisions:
            known = ", ".join([NO_QUANTIZATION, *sorted(host.precisions)])
            raise config.error(key, f"unknown precision {precision!r}; choose one of {known}")
    _check_optimizer(config, host, warn)
    if config.mixed_precision == "fp16":
        from tuner.core.runtime import device_type

        if device_type() != "cuda":
            raise config.error("mixed_precision", "fp16 needs a CUDA GPU; use bf16 or no")
    _check_trackers(config, host, warn)
    host.check_config(config, warn)
    return config


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
    from tuner.core.builtin import optimizer_options

    optimizer_options(config)  # a malformed optimizer_config is refused before anything loads
    if info.name == "prodigy" and config.learning_rate < 0.1:
        warn(
            f"{config.source}: learning_rate {config.learning_rate:g} with prodigy: Prodigy finds the step size "
            "itself and learning_rate multiplies it; 1.0 is the usual value"
        )


def _check_trackers(config: Config, host: PluginHost, warn: Any) -> None:
    """``report_to`` names a tracker nothing provides: say so (a run would report nowhere silently)."""
    from tuner.core.builtin import trackers

    installed = {record.name for record in host.records if not record.error and not record.disabled}
    for name in trackers(config):
        if name != "tensorboard" and name not in installed:
            warn(
                f"{config.source}: report_to: no installed plugin is named {name!r}, so nothing is reported "
                f"there; install a tracker plugin registered as {name!r} (or use tensorboard or none)"
            )


def _check_family_support(config: Config, family: Any, warn: Any) -> None:
    """Refuse keys the family cannot honour; warn about keys it ignores (only when the user set them)."""
    for name, key in config._keys.items():
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
    if value in ALL_FORMATS:
        if value == "both" and len(known) != 2:
            raise config.error(
                "lora_format", f"'both' means two formats, but {host.family.name} writes {', '.join(known)}; use all"
            )
        return [f for f in known if kind in host.lora_formats[f].adapter_types]
    wanted = [value] if isinstance(value, str) else list(value)
    unknown = [f for f in wanted if f not in known]
    if unknown or not wanted:
        raise config.error(
            "lora_format",
            f"{', '.join(map(repr, unknown)) or 'an empty list'}: choose from {', '.join(known)}, or all",
        )
    for name in wanted:
        if kind not in host.lora_formats[name].adapter_types:
            able = [f for f in known if kind in host.lora_formats[f].adapter_types]
            raise config.error(
                "lora_format",
                f"{name} cannot store lora_type {kind} (it holds {', '.join(host.lora_formats[name].adapter_types)}); "
                f"use {' or '.join(able)}",
            )
    return list(dict.fromkeys(wanted))


def model_source(config: Config, family_flavours: Mapping[str, str]) -> str:
    """The hub id or local folder to load: ``pretrained_model_name_or_path`` beats the flavour."""
    return config.pretrained_model_name_or_path or family_flavours[config.model_flavour]
