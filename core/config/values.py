"""Config values: YAML, JSON or JSON with comments read into a :class:`Config`, each value checked
against the key plugins offer for it (:func:`check_value`).

Every error is one line naming the file and key (and the closest valid key for a typo).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tuner.core.errors import ConfigError
from tuner.core.host.records import ConfigKey


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

    def set_resolved(self, name: str, value: Any) -> None:
        """Replace a value by what it resolves to while the config is built (the family for its
        alias, the flavour's default, ``all`` for the list of formats)."""
        self._values[name] = value

    @property
    def keys(self) -> dict[str, ConfigKey]:
        """Every key of the run (a copy), by name."""
        return dict(self._keys)

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


def check_value(key: ConfigKey, value: Any, where: str) -> Any:
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
            if key.maximum is not None and max(width, height) > key.maximum:
                raise ConfigError(
                    f"{where}: {name}: {width}x{height}: each side must be at most {_number(key.maximum)}"
                )
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
        raise ConfigError(f"{where}: {name}: must be at least {_number(key.minimum)}, got {value!r}")
    if key.maximum is not None and isinstance(value, (int, float)):
        if value >= key.maximum if key.maximum_exclusive else value > key.maximum:
            bound = f"below {_number(key.maximum)}" if key.maximum_exclusive else f"at most {_number(key.maximum)}"
            raise ConfigError(f"{where}: {name}: must be {bound}, got {value!r}")
    if key.multiple_of and isinstance(value, int) and value % key.multiple_of:
        raise ConfigError(f"{where}: {name}: must be a multiple of {key.multiple_of}, got {value}")
    problem = key.check(value) if key.check is not None else None
    if problem:
        raise ConfigError(f"{where}: {name}: {problem}")
    return value


def _number(bound: float) -> str:
    """A bound as people write it: 10000000, not 1e+07; 0.5 as 0.5."""
    if isinstance(bound, int):
        return str(bound)
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


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
    problems: list[str] = []  # every key's problem, said at once (one line each)
    for given, value in raw.items():
        name = alias_of.get(given, given)
        where = origins.get(given, source)
        if name not in keys:
            close = difflib.get_close_matches(given, list(keys) + list(alias_of), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else "; `tuner keys --plugin NAME` lists them"
            problems.append(f"{where}: unknown key {given!r}{hint}")
            continue
        if name in given_as:
            problems.append(f"{where}: {given_as[name]!r} and {given!r} are the same key ({name}); keep one")
            continue
        given_as[name] = given
        try:
            values[name] = check_value(keys[name], value, where)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("\n".join(problems))
    for name, key in keys.items():
        if name not in values:
            values[name] = list(key.default) if isinstance(key.default, (list, tuple)) else key.default
    return Config(values, keys, set(given_as), source)


def model_source(config: Config, family_flavours: Mapping[str, str]) -> str:
    """The hub id or local folder to load: ``pretrained_model_name_or_path`` beats the flavour."""
    return config.pretrained_model_name_or_path or family_flavours[config.model_flavour]
