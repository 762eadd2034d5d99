"""The new-run form, generated from the config keys of the chosen family (the core's and its
plugins'), and the way its values become a config: parsed per key kind, then validated by the same
``build_config`` that ``tuner run`` uses, so the UI shows the CLI's one-line messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuner.core.api import (
    CONFIGURE_ORDER,
    KEY_GROUPS,
    ConfigError,
    DataError,
    PluginError,
    build_config,
)
from tuner.plugins.webui.workspace import OutsideWorkspace, Workspace


def form_schema(host: Any) -> dict[str, Any]:
    """The family's keys in their groups (``ConfigKey.group``), central ones first; keys the form
    does not offer (``in_form``) and keys the family refuses or ignores are left out."""
    family = host.family
    keys = host.config_keys()
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {g: {"central": [], "advanced": []} for g in KEY_GROUPS}
    for key in sorted(keys.values(), key=lambda k: k.name):
        if not key.in_form or key.name in family.ignored_keys or family.refusal(key) is not None:
            continue
        default, choices = host.choices(key)
        if key.workspace_default is not None:
            default = key.workspace_default
        field = {
            "name": key.name,
            "kind": key.kind,
            "default": default,
            "choices": list(choices) if choices else None,
            "nullable": key.nullable,
            "help": key.help,
            "owner": key.owner,
            "memory": key.memory,
            "browse": key.image_folder,
        }
        place = "central" if key.ask or key.central else "advanced"
        groups[key.group][place].append(field)
    order = {name: index for index, name in enumerate(CONFIGURE_ORDER)}
    for parts in groups.values():
        parts["central"].sort(key=lambda f: (order.get(f["name"], len(order)), f["name"]))
    return {"family": family.name, "groups": [{"name": g, **groups[g]} for g in KEY_GROUPS]}


def parse_values(host: Any, values: dict[str, Any]) -> dict[str, Any]:
    """Form values (text, booleans, lists of lines) as config values; an empty field is unset."""
    import yaml

    keys = host.config_keys()
    raw: dict[str, Any] = {}
    for name, value in values.items():
        key = keys.get(name)
        if key is None or not key.in_form:
            raise ConfigError(f"form: {name}: not a key of {host.family.name}")
        if value is None or value == "" or value == []:
            continue
        if key.kind == "bool" or not isinstance(value, str):
            raw[name] = value
        elif key.kind in ("str", "path"):
            raw[name] = value
        elif key.kind == "str_list":
            raw[name] = [line.strip() for line in value.splitlines() if line.strip()]
        elif key.kind == "float":
            try:
                raw[name] = float(value)
            except ValueError:
                raw[name] = value  # build_config names the key and the expected kind
        else:
            try:
                raw[name] = yaml.safe_load(value)
            except yaml.YAMLError:
                raw[name] = value
    return raw


def config_file(workspace: Workspace, raw: dict[str, Any]) -> Path:
    """Where the UI saves a run's config: ``configs/<output folder name>.yaml``, the name cut to
    letters, digits, ``.``, ``_`` and ``-`` (it lands in a file name and a comment), and numbered
    (``-2``, ``-3``) when a config of that name belongs to another output folder."""
    import re

    output = str(raw.get("output_dir") or "output")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(output).name).strip(".-")[:80] or "run"
    folder = workspace.root / "configs"
    candidate, number = folder / f"{name}.yaml", 2
    while candidate.exists() and _output_of(candidate) != output:
        candidate, number = folder / f"{name}-{number}.yaml", number + 1
    return candidate


def _output_of(config_file: Path) -> str | None:
    """The output_dir a saved config names (None when it cannot be read)."""
    import yaml

    try:
        found = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return str(found.get("output_dir")) if isinstance(found, dict) else None


def validate(workspace: Workspace, host: Any, values: dict[str, Any], check_data: bool = False) -> dict[str, Any]:
    """``{"config": Config, "raw": ..., "file": Path}`` or ``{"error": message, "key": name}``: the
    message ``tuner run --config <that file>`` would print."""
    try:
        raw = parse_values(host, values)
    except ConfigError as exc:
        return _error(str(exc), "form")
    raw["model_family"] = host.family.name
    for key in host.config_keys().values():  # e.g. the cache inside the workspace, not ~/.cache
        if key.workspace_default is not None:
            raw.setdefault(key.name, key.workspace_default)
    file = config_file(workspace, raw)
    source = f"configs/{file.name}"  # what `tuner run --config` from the workspace would name
    warnings: list[str] = []
    try:
        config = build_config(host, raw, source, warn=warnings.append)
        _inside_workspace(workspace, config)
        if check_data:
            _check_data(config)
    except (ConfigError, DataError, PluginError) as exc:
        return _error(str(exc), source)
    return {"config": config, "raw": raw, "file": file, "warnings": warnings}


def _error(message: str, source: str) -> dict[str, Any]:
    rest = message.removeprefix(f"{source}: ")
    key = rest.split(":", 1)[0] if ":" in rest and " " not in rest.split(":", 1)[0] else None
    return {"error": message, "key": key}


def _inside_workspace(workspace: Workspace, config: Any) -> None:
    """The UI reads and writes only inside its workspace: every folder a run would use is checked."""
    folders = [(name, config[name]) for name in config.to_dict() if config.kind(name) == "path" and config[name]]
    folders += [(f"datasets[{i}].data_dir", entry["data_dir"]) for i, entry in enumerate(config.datasets or [])]
    if not config.cache_dir:
        folders.append(("cache_dir", None))
    for name, value in folders:
        if value is None:
            raise config.error(name, "set it to a folder inside the workspace (the default is outside it)")
        try:
            workspace.resolve(value, must_exist=False)
        except OutsideWorkspace:
            raise config.error(
                name, f"{value} is outside the workspace {workspace.root}; the web UI reads and writes only there"
            ) from None


def _check_data(config: Any) -> None:
    """The cheap data checks of a run (a folder with images), before a job is queued."""
    from tuner.core.api import caption_rule, scan_dataset
    from tuner.core.api import resolve_datasets as resolve

    datasets = resolve(config)
    if not datasets:
        raise config.error("data_dir", "is required: a folder of images with .txt captions (or datasets:)")
    for dataset in datasets:
        try:
            scan_dataset(dataset.config.data_dir, lambda message: None, caption_rule(dataset.config))
        except DataError as exc:
            raise config.error("data_dir", str(exc)) from None


def write_config(file: Path, raw: dict[str, Any]) -> Path:
    import yaml

    from tuner.core.api import atomic_write

    text = f"# written by tuner server; run it from the workspace with: tuner run --config configs/{file.name}\n"
    text += yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    return atomic_write(file, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def bucket_table(config: Any) -> str:
    """What ``tuner buckets`` prints for the config's data (image headers only), its warnings as notes."""
    from tuner.core.api import bucket_tables

    notes: list[str] = []
    tables = bucket_tables(config, config.train_batch_size, notes.append)
    return "\n".join(tables + [f"  note: {n}" for n in notes])
