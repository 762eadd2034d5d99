"""The plugin host: one pluggy manager per run, built from the ``tuner`` entry-point group.

Bundled plugins are found through the same entry points as third-party ones. Each entry point is
loaded on its own so one broken package is reported (with its distribution) instead of taking
the CLI down. A run registers the core's defaults, every plugin that offers no family, and the
one selected family plugin last, so the family answers its own provide hooks whatever the
plugins are called, and an extension overrides it only explicitly (``tryfirst`` or a wrapper).
The family's heavy implementation module is imported and registered the first time the run
asks for a hook (``host.hook``, ``host.provide``); building a config never imports it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import pluggy

from tuner.core import ENTRY_POINT_GROUP, PROJECT_NAME
from tuner.core.errors import PluginError, first_line
from tuner.core.host import hookspecs
from tuner.core.host.records import (
    ADAPTER_LAYOUTS,
    CHOICE_SOURCES,
    KEY_GROUPS,
    NO_QUANTIZATION,
    AdapterInfo,
    ConfigKey,
    FamilyInfo,
    LoraFormat,
    OptimizerInfo,
    PrecisionInfo,
)

CORE_PLUGIN_NAME = "core"
# the core's own plugins, registered first in every host: imported by name like entry points (the
# host sits below them in the layers: docs/architecture.md), objects instantiated per host
CORE_PLUGINS = (
    (CORE_PLUGIN_NAME, "tuner.core.builtin.defaults", None),
    ("jsonl-log", "tuner.core.builtin.logs", "JsonlLog"),
    ("tensorboard-log", "tuner.core.builtin.logs", "TensorBoardLog"),
)
# hooks a family's implementation module may not implement: they run before it is loaded
MANIFEST_HOOKS = (
    "register_families",
    "register_config_keys",
    "register_precisions",
    "register_lora_formats",
    "register_optimizers",
    "register_adapter_types",
    "register_commands",
    "check_config",
)


@dataclass
class PluginRecord:
    """An installed plugin as the host found it."""

    name: str
    distribution: str
    version: str
    module: ModuleType | object | None
    error: str | None = None
    disabled: bool = False

    @property
    def label(self) -> str:
        return f"plugin {self.name!r} (distribution {self.distribution} {self.version})"


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    return None if value is None else {n.strip() for n in value.split(",") if n.strip()}


def _core_plugins() -> list[tuple[str, object]]:
    found = []
    for name, module_name, class_name in CORE_PLUGINS:
        module = importlib.import_module(module_name)
        found.append((name, getattr(module, class_name)() if class_name else module))
    return found


def _load_entry_points() -> list[PluginRecord]:
    """Import each entry point on its own. TUNER_LOAD_PLUGINS (distributions or plugin names,
    comma-separated; empty: none) and TUNER_DISABLE_PLUGINS choose which are loaded."""
    only, disabled = _names("TUNER_LOAD_PLUGINS"), _names("TUNER_DISABLE_PLUGINS") or set()
    records = []
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        dist_name = dist.name if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        names = {ep.name, dist_name}
        if (only is not None and not names & only) or names & disabled:
            records.append(PluginRecord(ep.name, dist_name, version, None, disabled=True))
            continue
        try:
            module = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            error = first_line(exc)
            if os.environ.get("TUNER_STRICT_PLUGINS") == "1":
                raise PluginError(
                    f"plugin {ep.name!r} from distribution {dist_name} {version} failed to import: {error}"
                ) from exc
            records.append(PluginRecord(ep.name, dist_name, version, None, error))
            continue
        records.append(PluginRecord(ep.name, dist_name, version, module))
    return records


class PluginHost:
    """A fresh plugin manager and what its plugins registered.

    ``family=None`` builds a catalogue of everything installed (for ``tuner plugins``);
    naming a family builds the manager for a run of that family.
    ``extra_plugins`` are ``(name, plugin object)`` pairs registered like installed ones (tests,
    embedding); ``entry_points=False`` skips installed plugins except the core's defaults.
    """

    def __init__(
        self,
        family: str | None = None,
        *,
        extra_plugins: Iterable[tuple[str, object]] = (),
        entry_points: bool = True,
    ) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: list[PluginRecord] = [
            PluginRecord(name, "tuner", tuner_version(), plugin) for name, plugin in _core_plugins()
        ]
        if entry_points:
            self.records += _load_entry_points()
        self.records += [PluginRecord(n, "(registered in process)", "-", p) for n, p in extra_plugins]
        self.broken = [r for r in self.records if r.error]
        for record in self.records:
            if record.module is not None:
                self._register(record)

        self.families: dict[str, FamilyInfo] = self._collect("register_families", FamilyInfo, "family")
        self.precisions: dict[str, PrecisionInfo] = self._collect("register_precisions", PrecisionInfo, "precision")
        self.optimizers: dict[str, OptimizerInfo] = self._collect("register_optimizers", OptimizerInfo, "optimizer")
        self.adapter_types: dict[str, AdapterInfo] = self._collect(
            "register_adapter_types", AdapterInfo, "adapter type"
        )
        for info in self.adapter_types.values():
            if info.layout not in ADAPTER_LAYOUTS:
                raise PluginError(
                    f"{self._record(info.plugin).label}: adapter type {info.name!r} has layout {info.layout!r}; "
                    f"use one of {', '.join(ADAPTER_LAYOUTS)}"
                )
        self.family: FamilyInfo | None = None
        self._implementation_loaded = False
        self._formats: dict[str, LoraFormat] | None = None
        if family is not None:
            self.family = self.family_info(family)
            for name in {f.plugin for f in self.families.values()} - {self.family.plugin}:
                self.pm.unregister(name=name)
            # the family last: pluggy calls the last registered first, so the family answers its
            # own hooks before any extension that did not ask to go first (tryfirst)
            chosen = self._record(self.family.plugin)
            self.pm.unregister(name=chosen.name)
            self._register(chosen)
        self._check_pending()
        self._tracing = os.environ.get("TUNER_TRACE_PLUGINS") == "1"
        self._traced: set[int] = set()  # hook implementations already wrapped for tracing
        if self._tracing:
            self._trace()

    # -- building -----------------------------------------------------------------------------

    def _register(self, record: PluginRecord) -> None:
        if self.pm.has_plugin(record.name):  # pluggy's own message dumps its whole plugin table
            other = next(r for r in self.records if r.name == record.name and r is not record)
            raise PluginError(
                f"two plugins are named {record.name!r}: from distribution {other.distribution} {other.version} and "
                f"from {record.distribution} {record.version}; uninstall one, or leave one out with "
                f"TUNER_DISABLE_PLUGINS={record.distribution}"
            )
        try:
            self.pm.register(record.module, name=record.name)
        except ValueError as exc:
            raise PluginError(f"{record.label} cannot be registered: {first_line(exc)}") from None
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{record.label} has an invalid hook: {exc}") from None

    def _check_pending(self) -> None:
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{self._label(exc.plugin)}: {exc}") from None

    def _load_implementation(self) -> None:
        """Import the selected family's heavy module and register it as part of the family. A
        failure is raised again at the next call, never skipped."""
        family = self.family
        if family is None or not family.implementation:
            self._implementation_loaded = True
            return
        owner = self._record(family.plugin)
        try:
            module = importlib.import_module(family.implementation)
        except Exception as exc:
            raise PluginError(
                f"{owner.label}: the implementation {family.implementation} of family {family.name} "
                f"failed to import: {first_line(exc)}"
            ) from None
        record = PluginRecord(f"{family.plugin}:implementation", owner.distribution, owner.version, module)
        self._register(record)
        self.records.append(record)
        misplaced = [h for h in self.hooks_of(record.name) if h in MANIFEST_HOOKS]
        try:
            if misplaced:
                raise PluginError(
                    f"{owner.label}: {family.implementation} implements {', '.join(misplaced)}, which run before "
                    "it is loaded; move them to the entry-point module"
                )
            self._check_pending()
        except PluginError:
            self.pm.unregister(name=record.name)
            self.records.remove(record)
            raise
        self._implementation_loaded = True
        if self._tracing:
            self._trace()

    def _record(self, name: str) -> PluginRecord:
        return next(r for r in self.records if r.name == name)

    def _label(self, plugin: object) -> str:
        name = self.pm.get_name(plugin) if not isinstance(plugin, str) else plugin
        try:
            return self._record(name).label
        except StopIteration:
            return f"plugin {name!r}"

    def _collect(self, hook_name: str, cls: type, what: str) -> dict[str, Any]:
        """Call a register hook plugin by plugin so each offered item knows its owner."""
        found: dict[str, Any] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            record = self._record(impl.plugin_name)
            offered: list[Any] = []
            impl.function(register=offered.append)
            for item in offered:
                if not isinstance(item, cls):
                    raise PluginError(f"{record.label}: {hook_name} registered {item!r}, expected {cls.__name__}")
                if item.name in found:
                    other = self._record(found[item.name].plugin)
                    raise PluginError(
                        f"{what} {item.name!r} is registered twice: by {other.label} "
                        f"and by {record.label}; uninstall one or set TUNER_DISABLE_PLUGINS"
                    )
                found[item.name] = _with_owner(item, record)
        return found

    def _trace(self) -> None:
        """Print every hook call, and for provide hooks which plugin answered, on stderr."""
        import sys

        def traced(hook_name: str, plugin_name: str, function: Any, firstresult: bool) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                result = function(*args, **kwargs)
                if firstresult and result is not None:
                    print(f"tuner-trace: {hook_name} answered by {plugin_name}: {_summary(result)}", file=sys.stderr)
                elif not firstresult:
                    print(f"tuner-trace: {hook_name} called on {plugin_name}", file=sys.stderr)
                return result

            return call

        for name in dir(self.pm.hook):
            caller = getattr(self.pm.hook, name)
            if not hasattr(caller, "get_hookimpls") or caller.spec is None:
                continue
            firstresult = bool(caller.spec.opts.get("firstresult"))
            for impl in caller.get_hookimpls():
                if not impl.hookwrapper and not impl.wrapper and id(impl) not in self._traced:
                    impl.function = traced(name, impl.plugin_name, impl.function, firstresult)
                    self._traced.add(id(impl))

    # -- queries ------------------------------------------------------------------------------

    def family_info(self, name: str) -> FamilyInfo:
        if name not in self.families:
            known = ", ".join(sorted(self.families)) or "none"
            hint = "".join(f"; plugin {r.name!r} ({r.distribution}) failed to import: {r.error}" for r in self.broken)
            raise PluginError(f"unknown model family {name!r}; installed families: {known}{hint}")
        return self.families[name]

    def config_keys(self) -> dict[str, ConfigKey]:
        """Every key the plugins of this run offer, keyed by name (aliases resolved separately)."""
        keys: dict[str, ConfigKey] = {}
        for impl in self.pm.hook.register_config_keys.get_hookimpls():
            offered: list[ConfigKey] = []
            impl.function(register=offered.append)
            for key in offered:
                if key.name in keys:
                    raise PluginError(
                        f"config key {key.name!r} is offered by plugin {keys[key.name].owner!r} "
                        f"and by plugin {impl.plugin_name!r}"
                    )
                record = self._record(impl.plugin_name)
                if key.group not in ("", *KEY_GROUPS) or key.choices_from not in ("", *CHOICE_SOURCES):
                    bad = (
                        f"group {key.group!r}"
                        if key.group not in ("", *KEY_GROUPS)
                        else f"choices_from {key.choices_from!r}"
                    )
                    known = KEY_GROUPS if key.group not in ("", *KEY_GROUPS) else CHOICE_SOURCES
                    raise PluginError(
                        f"{record.label}: config key {key.name!r} has {bad}; use one of {', '.join(known)}"
                    )
                keys[key.name] = replace(_with_owner(key, record), group=key.group or KEY_GROUPS[0])
        return keys

    def choices(self, key: ConfigKey) -> tuple[Any, tuple[str, ...] | None]:
        """The default (the family's, ``FamilyInfo.defaults``, where it has one) and the allowed values
        of ``key`` as installed (``ConfigKey.choices_from``)."""
        default = self.family.defaults.get(key.name, key.default) if self.family is not None else key.default
        if key.choices_from == "flavours" and self.family is not None:
            return self.family.default_flavour, tuple(self.family.flavours)
        if key.choices_from == "precisions":
            return default, (NO_QUANTIZATION, *sorted(self.precisions))
        if key.choices_from == "adapter_types":
            return default, tuple(self.adapter_types)
        return default, key.choices

    @property
    def lora_formats(self) -> dict[str, LoraFormat]:
        """The LoRA formats the plugins of this run registered (a run host only)."""
        if self._formats is None:
            self._formats = self._collect("register_lora_formats", LoraFormat, "LoRA format")
        return self._formats

    def check_config(self, config: Any, warn: Any) -> None:
        """Run every plugin's ``check_config`` (manifests only: the family's implementation is not needed)."""
        self.pm.hook.check_config(config=config, warn=warn)

    @property
    def hook(self) -> Any:
        """Every hook of the run; the first use loads the selected family's implementation."""
        if not self._implementation_loaded:
            self._load_implementation()
        return self.pm.hook

    def call(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a hook, passing the run's ``family`` record to hooks whose spec takes it."""
        caller = getattr(self.hook, hook_name)
        if "family" in caller.spec.argnames and "family" not in kwargs:
            kwargs["family"] = self.family
        return caller(**kwargs)

    def provide(self, hook_name: str, **kwargs: Any) -> Any:
        """Call a firstresult hook and fail with a clear message when no plugin answers."""
        result = self.call(hook_name, **kwargs)
        if result is None:
            who = self.family.name if self.family else "no family selected"
            raise PluginError(f"no plugin answered hook {hook_name!r} (model family: {who})")
        return result

    def hooks_of(self, name: str) -> list[str]:
        """The hooks plugin ``name`` implements (a family's implementation is listed under
        ``<plugin>:implementation`` once loaded)."""
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            return []
        return sorted(c.name for c in self.pm.get_hookcallers(plugin) or [])


def _summary(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__}{tuple(shape)}"
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _with_owner(item: Any, record: PluginRecord) -> Any:
    from dataclasses import replace

    fields = {"plugin": record.name, "distribution": record.distribution}
    if isinstance(item, ConfigKey):
        fields = {"owner": record.name}
    return replace(item, **fields)


def tuner_version() -> str:
    from tuner.core import __version__

    return __version__
