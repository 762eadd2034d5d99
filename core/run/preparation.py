"""A run's data, made ready before the model loads: every dataset scanned and filtered, its images
in buckets and cached as latents, captions and validation prompts cached as text encodings, and
the held-out images of the eval loss split off and cached too."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuner.core.config.datasets import choose as choose_dataset
from tuner.core.config.datasets import describe as describe_datasets
from tuner.core.config.datasets import resolve as resolve_datasets
from tuner.core.config.keys.validation import validation_prompts
from tuner.core.data.cache import PreparedData, prepare_caches, text_key
from tuner.core.data.images import caption_rule, scan_dataset
from tuner.core.data.pairs import with_references
from tuner.core.errors import DataError
from tuner.core.run.evaluation import split_off

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from tuner.core.training.state import RunContext


@dataclass
class RunData:
    """What :func:`prepare_data` made ready."""

    prepared: PreparedData  # the training images of every dataset, cached, in one list
    datasets: list[Any]  # tuner.core.config.datasets.Dataset, in the config's order
    # per dataset, the encoding its dropped captions train with ({} without caption dropout)
    dropped_captions: list[dict[str, torch.Tensor]] = field(default_factory=list)
    held_out: PreparedData | None = None  # the eval loss's cached images (eval_steps)


def check_data_folders(config: Any) -> None:
    """Every dataset's folder (and the held-out one) exists: said before anything heavy starts."""
    datasets = resolve_datasets(config)
    if not datasets:
        raise config.error("data_dir", "is required: a folder of images with .txt captions (or datasets:)")
    folders = [(d, "data_dir", d.config.data_dir) for d in datasets]
    folders += [(d, "mask_dir", d.config.mask_dir) for d in datasets if d.config.mask_dir]
    folders += [
        (d, "conditioning_data_dir", d.config.conditioning_data_dir)
        for d in datasets
        if d.config.get("conditioning_data_dir")
    ]
    folders += [(None, "eval_data_dir", config.eval_data_dir)] * bool(config.eval_data_dir)
    for dataset, what, folder in folders:
        if not Path(folder).is_dir():
            problem = DataError(f"{what} {folder} is not a folder")
            if dataset is not None and len(datasets) > 1:
                problem = DataError(f"{dataset.label}: {problem}")
            raise problem


def prepare_data(ctx: RunContext) -> RunData:
    """Scan, filter, bucket and cache every dataset (the main process first, then each machine's
    first, the others reuse their cache entries); a one-line error names the dataset when one has
    no usable image."""
    config = ctx.config
    datasets = resolve_datasets(config)
    if not datasets:
        raise config.error("data_dir", "is required: a folder of images with .txt captions (or datasets:)")
    prompts = validation_prompts(config)
    extra = prompts + [config.validation_negative_prompt or ""] if prompts else []
    dropped = [dropped_caption(d.config) for d in datasets]  # what a dropped caption trains with
    paired = [bool(d.config.get("conditioning_data_dir")) for d in datasets]  # edit pairs: one encoding per pair
    shared = [t for t, own in zip(dropped, paired, strict=True) if t is not None and not own]
    extra += [t for t in dict.fromkeys(shared) if t not in extra]
    global_batch = config.train_batch_size * ctx.accelerator.num_processes
    scanned = [_scan(ctx, d, datasets) for d in datasets]
    first = next((i.reference for items in scanned for i in items if i.reference is not None), None)
    if prompts and first is not None and not config.get("validation_reference_image"):
        config.set_default("validation_reference_image", str(first))  # the recipe records it too
        ctx.log(f"validating edits of {first} (the first pair's reference; validation_reference_image chooses)")
    held_out_items: list = []
    if config.eval_split:  # from the first dataset
        if config.eval_split >= len(scanned[0]):
            raise config.error(
                "eval_split", f"{config.eval_split} would hold out every one of the {len(scanned[0])} images"
            )
        scanned[0], held_out_items = split_off(scanned[0], config.eval_split, config.seed)
    elif config.eval_data_dir:
        held_out_items = scan_dataset(config.eval_data_dir, ctx.warn, caption_rule(config))
    micro_batches = config.max_train_steps * config.gradient_accumulation_steps
    weights = [d.weight for d in datasets]
    drawn = (  # global batches each dataset gives: how many epochs of random crops to cache
        Counter(choose_dataset(config.seed, k, weights) for k in range(micro_batches))
        if len(weights) > 1
        else {0: micro_batches}
    )
    parts, held_out = [], None
    # the main process caches first, then each machine's first process whatever its own cache_dir lacks
    # (per-machine caches), then the others, who find every entry written
    with ctx.accelerator.main_process_first(), ctx.accelerator.local_main_process_first():
        for number, (dataset, items) in enumerate(zip(datasets, scanned, strict=True)):
            with _naming(dataset, datasets):  # no usable image after the filters, or too few for a batch
                part = prepare_caches(
                    ctx.host, dataset.config, items, extra, ctx.device, ctx.weight_dtype, ctx.warn, global_batch,
                    batch_count=drawn[number], extra_reference=validation_reference(config),
                    dropped_text=dropped[number],
                )  # fmt: skip
                entries = [replace(e, dataset=number) for e in part.entries] * (1 + dataset.config.dataset_repeats)
                if len(entries) < global_batch:
                    raise DataError(
                        f"data_dir {dataset.config.data_dir} has {len(entries)} usable image(s), fewer than one "
                        f"global batch ({config.train_batch_size} x {ctx.accelerator.num_processes} processes)"
                    )
            parts.append(replace(part, entries=entries))
        if held_out_items:
            held_out = prepare_caches(ctx.host, config, held_out_items, [], ctx.device, ctx.weight_dtype, ctx.warn)
    dropped_captions = [
        parts[0].text.load(text_key(t)) if t is not None and not own else {}
        for t, own in zip(dropped, paired, strict=True)
    ]
    return RunData(_joined(parts, datasets), datasets, dropped_captions, held_out)


def dropped_caption(config: Any) -> str | None:
    """The text a dataset's dropped captions train with: "" or, when asked, its caption_prefix;
    None without caption dropout."""
    if config.caption_dropout_probability <= 0:
        return None
    return caption_rule(config).prefix if config.caption_dropout_keeps_prefix else ""


def _joined(parts: list[PreparedData], datasets: list[Any]) -> PreparedData:
    """Several datasets' caches as one list of entries, with a table of each one's buckets and share."""
    if len(parts) == 1:
        return parts[0]
    shares = describe_datasets(datasets)
    table = "\n".join(
        f"{d.label}, {shares[d.id]['share']:.0%} of batches: {p.plan.table()}"
        for d, p in zip(datasets, parts, strict=True)
    )
    entries = [e for part in parts for e in part.entries]
    return replace(parts[0], entries=entries, skipped=sum(p.skipped for p in parts), table=table)


def _scan(ctx: RunContext, dataset: Any, datasets: list[Any]) -> list:
    """A dataset's images and captions (and an edit pair's reference)."""
    with _naming(dataset, datasets):
        items = scan_dataset(dataset.config.data_dir, ctx.warn, caption_rule(dataset.config), dataset.config.mask_dir)
        if dataset.config.get("conditioning_data_dir"):
            root = Path(dataset.config.data_dir)
            items = with_references(items, root, dataset.config.conditioning_data_dir, ctx.warn)
        return items


def validation_reference(config: Any) -> Path | None:
    """The reference image edit validation renders from (encoded with the validation prompts)."""
    return Path(config.validation_reference_image) if config.get("validation_reference_image") else None


@contextmanager
def _naming(dataset: Any, datasets: list[Any]) -> Iterator[None]:
    """With several datasets, a DataError raised inside names the entry."""
    try:
        yield
    except DataError as exc:
        if len(datasets) == 1:
            raise
        raise DataError(f"{dataset.label}: {exc}") from None
