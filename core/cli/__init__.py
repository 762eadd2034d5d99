"""The ``tuner`` command line. Importing it must not import torch: heavy work happens inside commands."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from tuner.core.errors import ConfigError, Interrupted, PluginError, TunerError

app = typer.Typer(
    name="tuner",
    help="LoRA training for flow-matching diffusion transformers (Chroma 1, Flux.1), extended by plugins.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

from tuner.core.cli.lora import lora_app  # noqa: E402  (typer only: cheap)

app.add_typer(lora_app, name="lora")

PLUGIN_OPTION = typer.Option(None, "--plugin", "-p", help="Model family (see `tuner plugins`).")
SET_OPTION = typer.Option(None, "--set", help="Override a config key: --set key=value (repeatable).")


def _host(family: str | None):
    from tuner.core.host.manager import PluginHost

    return PluginHost(family)


def _load_config(plugin: str | None, config_path: Path | None, overrides: list[str] | None, require_family=True):
    """Read the file and overrides, pick the family, and validate: returns (host, config)."""
    from tuner.core.config.build import build_config
    from tuner.core.config.values import parse_overrides, read_config_file

    raw: dict[str, Any] = read_config_file(config_path) if config_path else {}
    from tuner.core.config import simpletuner

    if config_path and simpletuner.is_simpletuner(raw):  # a SimpleTuner config.json, converted on the fly
        family = plugin or str(raw.get("--model_family") or raw.get("model_family"))
        raw, notes = simpletuner.load(config_path, _host(family))
        for note in notes:
            typer.echo(f"note: {config_path}: {note}", err=True)
    overridden = parse_overrides(overrides or [])
    raw.update(overridden)
    family = plugin or raw.get("model_family")
    if family is None:
        from tuner.core.host.manager import PluginHost

        known = ", ".join(sorted(PluginHost().families)) or "none installed"
        raise PluginError(f"choose a model family with --plugin NAME or model_family in the config ({known})")
    host = _host(str(family))
    config = build_config(
        host,
        raw,
        str(config_path) if config_path else "--set",
        warn=None if _says_config_warnings() else lambda message: None,
        origins=dict.fromkeys(overridden, "--set"),
    )
    return host, config


def _says_config_warnings() -> bool:
    """Warnings about the settings are said once: by the main process of several, and not again by
    the processes `tuner run --processes` started after saying them itself."""
    from tuner.core.cli.launch import SAID_BY_LAUNCHER

    return os.environ.get("RANK", "0") == "0" and os.environ.get(SAID_BY_LAUNCHER) != "1"


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="Config file (.yaml, .json or .jsonc)."),
    plugin: str | None = PLUGIN_OPTION,
    set_: list[str] | None = SET_OPTION,
    processes: int = typer.Option(
        1,
        "--processes",
        "-n",
        min=1,
        help="Train in N processes on this machine (DDP: one per GPU; gloo on a CPU), started by tuner itself. "
        "Leave it out under accelerate launch or torchrun.",
    ),
) -> None:
    """Train a LoRA: cache latents and captions, train, validate, save."""
    host, cfg = _load_config(plugin, config, set_)
    if processes > 1:  # the settings and data folders are checked here, once, before N processes start
        from tuner.core.cli.launch import launch
        from tuner.core.run.preparation import check_data_folders

        check_data_folders(cfg)
        arguments = ["run", "--config", str(config), *(["--plugin", plugin] if plugin else [])]
        launch(processes, arguments + [arg for value in set_ or [] for arg in ("--set", value)])
        return
    from tuner.core.run.trainer import run as train

    result = train(host, cfg)
    if result.lora_files:  # the main process wrote them; the others have nothing to report
        final = f" (final loss {result.losses[-1]:.4f})" if result.losses else ""
        typer.echo(f"saved {', '.join(map(str, result.lora_files))} after {result.steps} steps{final}")
    if result.validation_dirs:
        typer.echo(f"validation images: {result.validation_dirs[-1]}")


@app.command()
def plugins(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per plugin."),
    show_all: bool = typer.Option(False, "--all", help="Also list plugins disabled by TUNER_*_PLUGINS."),
    plugin: str | None = typer.Option(
        None, "--plugin", "-p", help="Build the host of a run of this family (its implementation's hooks listed too)."
    ),
) -> None:
    """List installed plugins with their distribution, version, families, precisions, optimizers and hooks."""
    host = _host(plugin)
    if plugin is not None:
        host.hook  # noqa: B018 (loads the family's implementation, as a run does)
    rows = []
    for record in host.records:
        if record.disabled and not show_all:
            continue
        if plugin is not None and record.module is not None and host.pm.get_plugin(record.name) is None:
            continue  # another family: not part of this run
        families = sorted(f.name for f in host.families.values() if f.plugin == record.name)
        rows.append(
            {
                "name": record.name,
                "distribution": record.distribution,
                "version": record.version,
                "families": families,
                "implementation": next(
                    (f.implementation for f in host.families.values() if f.plugin == record.name), None
                ),
                "precisions": sorted(p.name for p in host.precisions.values() if p.plugin == record.name),
                "optimizers": sorted(o.name for o in host.optimizers.values() if o.plugin == record.name),
                "adapter_types": [a.name for a in host.adapter_types.values() if a.plugin == record.name],
                "missing": _missing_libraries(host, record),
                "hooks": host.hooks_of(record.name),
                "error": record.error,
                "disabled": record.disabled,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    for row in rows:
        provides = ", ".join(
            [f"family {f}" for f in row["families"]]
            + [f"precision {p}" for p in row["precisions"]]
            + [f"optimizer {o}" for o in row["optimizers"]]
            + [f"adapter type {a}" for a in row["adapter_types"]]
        )
        typer.echo(
            f"{row['name']:<12} {row['distribution']} {row['version']}" + (f"  [{provides}]" if provides else "")
        )
        if row["missing"]:
            typer.echo(f"    not usable here: {'; '.join(row['missing'])}")
        if row["disabled"]:
            typer.echo("    disabled (TUNER_LOAD_PLUGINS / TUNER_DISABLE_PLUGINS)")
        elif row["error"]:
            typer.echo(f"    failed to import: {row['error']}")
        else:
            typer.echo(f"    hooks: {', '.join(row['hooks'])}")
            if row["implementation"]:
                typer.echo(f"    implementation: {row['implementation']} (its hooks: tuner plugins --plugin NAME)")


def _missing_libraries(host: Any, record: Any) -> list[str]:
    """What a plugin needs and this environment lacks: its precisions' and optimizers' ``requires`` and a module's
    or object's ``REQUIRES`` (with ``INSTALL_HINT``), each with how to install it."""
    import importlib.util

    def absent(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):
            return True

    offered = [*host.precisions.values(), *host.optimizers.values()]
    needs: list[tuple[tuple[str, ...], str]] = [
        (p.requires, p.install_hint) for p in offered if p.plugin == record.name
    ]
    if getattr(record.module, "REQUIRES", None):
        needs.append((tuple(record.module.REQUIRES), getattr(record.module, "INSTALL_HINT", "")))
    found = []
    for modules, hint in needs:
        lacking = [m for m in modules if absent(m)]
        if lacking:
            found.append(f"{', '.join(lacking)} is not installed" + (f" ({hint})" if hint else ""))
    return list(dict.fromkeys(found))


@app.command()
def keys(plugin: str = typer.Option(..., "--plugin", "-p", help="Model family.")) -> None:
    """List the config keys a family accepts, in their groups, with defaults, aliases and the plugin
    that owns each; keys the family ignores or refuses say so."""
    from tuner.core.host.records import KEY_GROUPS

    host = _host(plugin)
    family = host.family
    keys = host.config_keys().values()
    ordered = sorted(keys, key=lambda k: (KEY_GROUPS.index(k.group), k.name))
    for index, key in enumerate(ordered):
        if index == 0 or ordered[index - 1].group != key.group:
            typer.echo(f"{'' if index == 0 else chr(10)}[{key.group}]")
        aliases = f" (alias: {', '.join(key.aliases)})" if key.aliases else ""
        choices = f" [{'|'.join(key.choices)}]" if key.choices else ""
        typer.echo(f"{key.name}{aliases}: {key.kind}{choices} = {key.default!r}  <{key.owner}>\n    {key.help}")
        refusal = family.refusal(key)
        if refusal is not None:
            typer.echo(f"    REFUSED by {family.name} when set: {refusal}")
        elif key.name in family.ignored_keys:
            typer.echo(f"    IGNORED by {family.name} (a warning when set): {family.ignored_keys[key.name]}")


@app.command()
def sigmas(
    plugin: str | None = PLUGIN_OPTION,
    config: Path | None = typer.Option(None, "--config", "-c", help="Config file whose sampling to show."),
    samples: int = typer.Option(100_000, "--samples", "-n", min=1, help="How many sigmas to draw."),
    bins: int = typer.Option(20, "--bins", min=1, max=1000, help="Histogram bins over [0, 1]."),
    as_json: bool = typer.Option(False, "--json", help='Print {"edges": [...], "counts": [...], "mean": m}.'),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Show the distribution of training noise levels (sigma) a config trains with."""
    host, cfg = _load_config(plugin, config, set_)
    import torch

    from tuner.core.model import flow

    channels, downscale = host.family.latent_layout
    latent = cfg.resolution // downscale
    drawn = host.provide(
        "sample_sigmas",
        config=cfg,
        batch_size=samples,
        latent_shape=(samples, channels, latent, latent),
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    edges, counts = flow.histogram(drawn, bins)
    mean = round(float(drawn.double().mean()), 6)
    if as_json:
        typer.echo(json.dumps({"edges": edges, "counts": counts, "mean": mean}))
        return
    typer.echo(f"sigma distribution of {cfg.model_family} ({samples} samples, seed {cfg.seed}, mean {mean:.3f})")
    peak = max(counts) or 1
    for lo, hi, count in zip(edges, edges[1:], counts, strict=False):
        typer.echo(f"{lo:4.2f}-{hi:4.2f} {'#' * round(40 * count / peak):<40} {100 * count / samples:5.1f}%")


@app.command()
def buckets(
    plugin: str | None = PLUGIN_OPTION,
    config: Path = typer.Option(..., "--config", "-c", help="Config file whose data to bucket."),
    processes: int = typer.Option(1, "--processes", min=1, help="Processes the run will use (global batch)."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Print the aspect-ratio buckets a config trains with (sizes and image counts), without training:
    images are read by their headers only."""
    host, cfg = _load_config(plugin, config, set_)
    from tuner.core.config.datasets import resolve
    from tuner.core.data.cache import bucket_tables
    from tuner.core.errors import warn_user

    if not resolve(cfg):
        raise cfg.error("data_dir", "is required: a folder of images with .txt captions (or datasets:)")
    for table in bucket_tables(cfg, cfg.train_batch_size * processes, warn_user):
        typer.echo(table)


@app.command()
def configure(
    plugin: str | None = PLUGIN_OPTION,
    output: Path = typer.Option(Path("config.yaml"), "--output", "-o", help="Config file to write."),
    defaults: bool = typer.Option(False, "--defaults", help="Take every default without asking (needs --data-dir)."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="The dataset folder (the one setting without a default)."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
) -> None:
    """Ask for the central settings (family, flavour, rank, rate, precision, data, ...) and write a config."""
    from tuner.core.cli.wizard import default_family, run_wizard, write_config

    if defaults and data_dir is None:
        raise ConfigError("--defaults writes a config that runs: give --data-dir FOLDER (data_dir has no default)")
    if output.exists() and not force:  # before any question: answers are never thrown away
        raise ConfigError(f"{output} exists; choose another --output or add --force to replace it")
    if defaults and plugin is None:
        plugin = default_family()
        typer.echo(f"family: {plugin} (the default; choose another with --plugin)")

    def ask(question: str, default: str) -> str:
        if question.startswith("data_dir") and data_dir is not None:
            return str(data_dir)
        try:
            return typer.prompt(question, default=default, show_default=bool(default))
        except typer.Abort:  # stdin ended (a pipe) or Ctrl-D
            raise ConfigError(f"configure: input ended at the question {question.split(':')[0]!r}") from None

    host, settings = run_wizard(plugin, ask, typer.echo, defaults, {"data_dir": str(data_dir)} if data_dir else {})
    path = write_config(host, settings, output)
    typer.echo(f"wrote {path}; train with: tuner run --config {path}")


@app.command()
def estimate(
    plugin: str | None = PLUGIN_OPTION,
    config: Path | None = typer.Option(None, "--config", "-c", help="Config file (default: the family's defaults)."),
    device: str | None = typer.Option(
        None, "--device", help="cuda, mps or cpu (default: this machine's accelerator, else cpu)."
    ),
    compare: bool = typer.Option(False, "--compare", help="One row per installed base_model_precision."),
    plan: bool = typer.Option(
        False, "--plan", help="The memory plans (precision, blocks to swap, offload_during_startup), fastest first."
    ),
    budget: str | None = typer.Option(
        None, "--budget", help="With --plan: pick the fastest plan that fits, e.g. 12GiB."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate(s) as JSON."),
    processes: int = typer.Option(
        1, "--processes", min=1, help="With fsdp_enable: the memory of one of N processes (FSDP2 shares)."
    ),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Estimate peak accelerator memory and system RAM of a run, from the model's config files only."""
    if device is not None and device not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"--device {device!r}: choose cuda, mps or cpu")
    host, cfg = _load_config(plugin, config, set_)
    if (plan or budget is not None) and cfg.model_type == "full":
        raise ConfigError(
            "--plan: the plans quantize and swap the base, which model_type: full trains; compare "
            "--set bf16_stochastic_rounding=true and --set optimizer=adafactor (or adamw8bit) instead"
        )
    if (plan or budget is not None) and cfg.fsdp_enable:
        raise ConfigError("--plan: the plans quantize and swap the base of one process; fsdp_enable shards it instead")
    if plan or budget is not None:
        _print_plans(host, cfg, device, budget, as_json)
        return
    from tuner.core.config.keys.model import NO_QUANTIZATION
    from tuner.core.estimate import estimate_precisions, size
    from tuner.core.estimate.sharded import per_process

    if processes > 1 and not cfg.fsdp_enable:
        typer.echo(f"DDP: each of the {processes} processes needs all of this (fsdp_enable: true shards it)")
    precisions = [NO_QUANTIZATION, *sorted(host.precisions)] if compare else [cfg.base_model_precision]
    found = [per_process(e, cfg, processes) for e in estimate_precisions(host, cfg, precisions, device)]
    if as_json:
        typer.echo(json.dumps([e.to_dict() for e in found] if compare else found[0].to_dict(), indent=1))
        return
    if not compare:
        typer.echo(found[0].table())
        return
    first = found[0]
    typer.echo(first.table().splitlines()[0].replace(f"base {first.precision}, ", ""))
    typer.echo(f"  {'base_model_precision':<22}{'train':>12}{'peak':>12}{'plan for':>12}{'system RAM':>12}  peak phase")
    for e in found:
        train = e.phase("train")
        typer.echo(
            f"  {e.precision:<22}{size(train.device):>12}{size(e.peak_device):>12}{size(e.plan_device):>12}"
            f"{size(e.peak_ram):>12}  {e.peak_phase.name}"
        )
    typer.echo("\n".join(f"note: {n}" for n in dict.fromkeys(n for e in found for n in e.notes)))


def _print_plans(host: Any, cfg: Any, device: str | None, budget: str | None, as_json: bool) -> None:
    from tuner.core.config.keys.model import parse_budget
    from tuner.core.estimate.plan import choose, memory_plans, none_fits, plan_table
    from tuner.core.estimate.report import available_ram, size

    try:
        wanted = parse_budget(budget) if budget is not None else None
    except ValueError as exc:
        raise ConfigError(f"--budget: {exc}") from None
    plans = memory_plans(host, cfg, device)
    chosen = choose(plans, wanted, available_ram()) if wanted is not None else None
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in plans], indent=1))
    else:
        # the header describes the run as configured (the plan with the config's own values)
        as_set = next((p for p in plans if all(p.settings[k] == cfg.get(k) for k in p.settings)), None)
        typer.echo((as_set or plans[0]).estimate.table().splitlines()[0] if plans else "no plan")
        typer.echo(plan_table(plans))
        typer.echo("step: relative step time by a cost model measured on one H200 (tuner.core.estimate.plan)")
    if wanted is not None and chosen is None:
        raise ConfigError(f"--budget {budget}: {none_fits(plans, wanted, available_ram())}")
    if chosen is not None and not as_json:
        keys = " ".join(f"--set {k}={v}" for k, v in chosen.settings.items())
        typer.echo(f"chosen for {budget}: {keys} (plan for {size(chosen.estimate.plan_device)})")


@app.command()
def sample(
    plugin: str | None = PLUGIN_OPTION,
    config: Path | None = typer.Option(None, "--config", "-c", help="The run's config file."),
    recipe: Path | None = typer.Option(None, "--recipe", help="recipe.json written beside a trained LoRA."),
    lora: str | None = typer.Option(None, "--lora", help="LoRA file to apply (default: the recipe's)."),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="Prompt (repeatable)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the first image."),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Sampler steps."),
    guidance: float | None = typer.Option(None, "--guidance", help="Guidance scale (the family's validation key)."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    reference: Path | None = typer.Option(
        None, "--reference", help="Edit models: the image the prompts edit (validation_reference_image)."
    ),
    scale: float = typer.Option(1.0, "--lora-scale", help="LoRA strength."),
    out: Path = typer.Option(Path("samples"), "--out", help="Folder for the PNGs."),
    set_: list[str] | None = SET_OPTION,
) -> None:
    """Render images with the same pipeline, masks and settings validation used."""
    from tuner.core.config.build import build_config
    from tuner.core.config.values import parse_overrides, read_config_file
    from tuner.core.run.sampling import recipe_problem, recipe_settings

    raw: dict[str, Any] = read_config_file(config) if config else {}
    prompts, seeds = list(prompt or []), None
    if recipe:
        try:
            saved = json.loads(Path(recipe).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--recipe {recipe}: cannot read it: {exc}") from None
        problem = recipe_problem(saved)
        if problem is not None:
            raise ConfigError(f"--recipe {recipe}: {problem}")
        raw.update(recipe_settings(saved))
        plugin = plugin or saved["family"]
        lora = lora or saved["lora_file"]
        prompts = prompts or saved["prompts"]
        seeds = None if prompt or seed is not None else saved["seeds"]
        scale = saved.get("lora_scale", scale) if scale == 1.0 else scale
    family = plugin or raw.get("model_family")
    if family is None:
        raise PluginError("choose a model family with --plugin NAME, a config or a recipe")
    host = _host(str(family))
    keys = host.config_keys()
    # a recipe records every sampling-relevant key; those at their default are left unset, so the
    # config's "X is ignored because ..." notes stay for what the user set
    raw = {k: v for k, v in raw.items() if not (recipe and k in keys and v == keys[k].default)}
    for key, value in (
        ("validation_num_inference_steps", steps),
        ("validation_negative_prompt", negative_prompt),
        ("validation_reference_image", str(reference) if reference is not None else None),
        (host.family.guidance_key, guidance),
    ):
        if value is not None:
            raw[key] = value
    raw.update(parse_overrides(set_ or []))
    raw.pop("validation_prompts", None)
    raw.pop("validation_prompt", None)
    cfg = build_config(host, raw, str(config or recipe or "--set"))
    if not prompts:
        raise ConfigError("give at least one --prompt (or a --recipe)")
    if seeds is None:
        first = seed if seed is not None else cfg.seed
        seeds = [first + i for i in range(len(prompts))]
    from tuner.core.config.keys.validation import validation_sizes
    from tuner.core.io import atomic_write
    from tuner.core.run.sampling import render

    if lora is None:
        typer.echo("no --lora: rendering the base model")
    elif not Path(lora).is_file():  # before the model loads, not a diffusers error after it
        raise ConfigError(f"--lora {lora}: no such file")
    sizes = validation_sizes(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for (width, height), images in zip(sizes, render(host, cfg, prompts, seeds, lora, sizes, scale), strict=True):
        suffix = f"_{width}x{height}" if len(sizes) > 1 else ""
        for index, (image, used_seed) in enumerate(zip(images, seeds, strict=True)):
            path = out / f"{index:02d}_seed{used_seed}{suffix}.png"
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            typer.echo(f"wrote {path}")


@app.command("convert-config")
def convert_config(
    config: Path = typer.Argument(..., help="SimpleTuner config.json (its data_backend_config is read too)."),
    plugin: str | None = PLUGIN_OPTION,
    output: Path = typer.Option(Path("config.yaml"), "--output", "-o", help="tuner config to write."),
) -> None:
    """Write the tuner config equivalent to a SimpleTuner config.json (and its multidatabackend.json)."""
    from tuner.core.cli.wizard import write_config
    from tuner.core.config import simpletuner
    from tuner.core.config.values import read_config_file

    raw = read_config_file(config)
    family = plugin or raw.get("--model_family") or raw.get("model_family")
    if not family:
        raise PluginError(f"{config}: no model_family; pass --plugin NAME")
    host = _host(str(family))
    settings, notes = simpletuner.load(config, host)
    for note in notes:
        typer.echo(f"note: {note}")
    path = write_config(host, settings, output, source=str(config), origin=f"`tuner convert-config` from {config}")
    typer.echo(f"wrote {path}; train with: tuner run --config {path}")


@app.command("check-lora")
def check_lora(
    file: Path = typer.Argument(..., help="LoRA .safetensors file (diffusers, kohya or ComfyUI layout)."),
    plugin: str = typer.Option(..., "--plugin", "-p", help="Model family the LoRA is for."),
    model: str | None = typer.Option(None, "--model", help="Base model (hub id or folder); default: the flavour."),
    flavour: str | None = typer.Option(None, "--flavour", help="Model flavour when --model is not given."),
    lora_format: str = typer.Option(
        "auto", "--format", help="auto, or a format the family registers: diffusers (also kohya), comfyui, ..."
    ),
) -> None:
    """Load a LoRA the way its runtime does and list every key that runtime would ignore."""
    from tuner.core.config.build import build_config

    if not file.is_file():
        raise PluginError(f"{file} does not exist")
    host = _host(plugin)
    import torch
    from safetensors import safe_open

    from tuner.core.errors import DataError
    from tuner.core.model.lora import METADATA_KEY

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
            record = _training_record(handle.metadata() or {}, METADATA_KEY)
    except Exception as exc:
        raise DataError(f"{file} is not a readable safetensors file: {exc}") from None
    if model is None and flavour is None and record.get("base_model"):  # the base it was trained on
        model = str(record["base_model"])
        typer.echo(f"base model: {model} (from the file's {METADATA_KEY} metadata; --model overrides)")
    raw = {k: v for k, v in {"pretrained_model_name_or_path": model, "model_flavour": flavour}.items() if v}
    config = build_config(host, raw, "check-lora", warn=lambda m: None)
    formats = host.lora_formats
    if lora_format == "auto":  # the family's formats first; the core's diffusers reader (kohya too) otherwise
        found = (n for n, f in reversed(formats.items()) if f.detect and f.detect(keys))
        lora_format = next(found, next(iter(formats)))
    if lora_format not in formats:
        raise ConfigError(f"--format {lora_format!r}: {plugin} reads {', '.join(formats)} (or auto)")
    from tuner.core.config.values import model_source
    from tuner.core.model.hub import check_model_folder

    if not Path(model_source(config, host.family.flavours)).exists():
        try:  # a hub id that cannot be had: said at once, not after retries
            check_model_folder(host, config)
        except TunerError as exc:
            raise type(exc)(f"{exc}; pass --model FOLDER (a local copy of the base model)") from None
    transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    try:
        reading = formats[lora_format].read(str(file), transformer, host.family)
    except (RuntimeError, ValueError, KeyError) as exc:  # e.g. lora_A and lora_B of different ranks
        from tuner.core.errors import first_line

        typer.echo(f"FAIL: {file}: its updates cannot be computed: {first_line(exc)}")
        raise typer.Exit(1) from None
    weights = {
        name: module.weight.shape
        for name, module in transformer.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }
    misshapen = {
        m: tuple(d.shape) for m, d in reading.deltas.items() if m in weights and tuple(d.shape) != tuple(weights[m])
    }
    broken = [m for m, d in reading.deltas.items() if not torch.isfinite(d).all()]
    changed = sum(1 for delta in reading.deltas.values() if delta.abs().max() > 0)
    adapter = host.adapter_types.get(str(record.get("lora_type", "")))
    lacking = _lacking_parts(adapter, keys, reading.deltas) if adapter is not None else []
    kind = f"lora_type {adapter.name}, " if adapter is not None else ""
    typer.echo(f"{file}: {kind}{lora_format} layout, {len(keys)} keys; {changed} modules of {plugin} receive a change")
    for key in reading.unmatched:
        typer.echo(f"  not loaded: {key}")
    for module, shape in sorted(misshapen.items()):
        typer.echo(f"  wrong shape: {module} gets an update of {list(shape)}, its weight is {list(weights[module])}")
    for module in sorted(broken):
        typer.echo(f"  not finite: {module} gets NaN or inf")
    for key in lacking[:10]:
        typer.echo(f"  missing: {key}")
    failures = []
    if lacking:
        failures.append(
            f"{len(lacking)} tensors a {adapter.name} file holds are missing (it would load as another adapter)"
        )
    if reading.unmatched:
        failures.append(f"{len(reading.unmatched)} keys would be ignored")
    if misshapen:
        failures.append(f"{len(misshapen)} updates do not fit their layer (diffusers would widen it, then fail)")
    if broken:
        failures.append(f"{len(broken)} updates are NaN or inf")
    if not failures and not changed:
        failures.append("the file changes nothing")
    if failures:
        typer.echo("FAIL: " + "; ".join(failures))
        raise typer.Exit(1)
    typer.echo("OK: every key loads")


def _training_record(metadata: dict[str, str], key: str) -> dict[str, Any]:
    """tuner's training record in a LoRA file's metadata ({} when absent or unreadable)."""
    try:
        record = json.loads(metadata.get(key, "{}"))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _lacking_parts(adapter: Any, keys: list[str], deltas: dict[str, Any]) -> list[str]:
    """The per-module tensors of ``adapter.required_parts`` (a DoRA's magnitudes) that a file under
    diffusers' ``transformer.`` names lacks for a module it changes."""
    if not any(k.startswith("transformer.") for k in keys):
        return []  # another layout keeps them otherwise (ComfyUI's dora_scale)
    present = set(keys)
    return [
        f"transformer.{module}.{part}"
        for module in sorted(deltas)
        for part in adapter.required_parts
        if f"transformer.{module}.{part}" not in present
    ]


_plugin_commands_added = False


def register_plugin_commands() -> None:
    """Add the installed plugins' commands to the app (once per process)."""
    global _plugin_commands_added
    if _plugin_commands_added:
        return
    try:
        host = _host(None)
    except TunerError:
        return  # `tuner plugins` reports the problem
    host.hook.register_commands(app=app)
    _plugin_commands_added = True


def _quiet_libraries() -> None:
    """Keep third-party notices that every CPU run prints off the terminal, so a one-line error is
    one line and a run's output is tuner's: bitsandbytes' "Failed to load CPU gemm_4bit_forward from
    kernels-community" (its logger, at import), diffusers' FluxPosEmbed FutureWarning (inside its own
    Flux and Chroma models) and transformers' "requires torchvision" notices. A user's own
    TRANSFORMERS_VERBOSITY / DIFFUSERS_VERBOSITY win."""
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*FluxPosEmbed.*", category=FutureWarning)


def _cpu_defaults() -> None:
    """OpenMP threads that wait for work spin for a while first (GNU libgomp: 300,000 spins by
    default); when another process needs the core, the spinning pool collapses (the tiny example:
    4.6x slower beside one busy process). A short spin keeps a quiet run as fast and a shared core
    usable (benchmarks: docs/benchmarks.md, "A busy CPU"). Set before torch loads libgomp; a user's
    own setting wins."""
    import os

    os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def main() -> None:
    _cpu_defaults()
    _quiet_libraries()
    register_plugin_commands()
    try:
        app()
    except Interrupted as exc:
        typer.echo(str(exc), err=True)
        sys.exit(130)
    except (TunerError, ConfigError) as exc:
        for line in str(exc).splitlines() or [""]:  # a config with several problems: one line each
            typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        typer.echo(
            f"error: disk full while writing {exc.filename or 'a file'}; free some space and run again "
            "(cache entries and checkpoints written so far are kept)",
            err=True,
        )
        sys.exit(2)
