"""LoRA files after training: resizing, by the arithmetic of their layers alone.

A low-rank layer in a file is a pair (down ``A``, up ``B``) and its scale ``alpha / rank``, in any of
the layouts tuner writes and the community uses: peft's ``lora_A`` / ``lora_B`` (diffusers), kohya's
and ComfyUI's ``lora_down`` / ``lora_up``, each with an ``.alpha`` tensor beside it or none (then
alpha is the rank, scale 1). The layer's change is ``scale * B @ A``; resizing takes its singular
value decomposition in fp32 and keeps the largest values: by Eckart-Young the best change of that
rank, exact when the rank is the layer's own. ComfyUI's fused layers (q, k, v stacked, rank 3r)
resize as the one matrix they are. Types whose change is not such a product (DoRA's magnitudes,
LoKr's and LoHa's factors) are refused with one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tuner.core.errors import DataError

PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))
NOT_LOW_RANK = {  # a key part that marks an adapter whose change is not one product B @ A
    "lora_magnitude_vector": "DoRA (a magnitude per row beside the product)",
    "dora_scale": "DoRA (a magnitude per row beside the product)",
    "lokr_": "LoKr (Kronecker factors)",
    "hada_": "LoHa (Hadamard factors)",
}


@dataclass
class LowRankLayer:
    """One layer of a file: its keys and tensors."""

    module: str  # the key prefix the file uses for it
    down_key: str
    up_key: str
    alpha_key: str | None
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def change(self) -> torch.Tensor:
        """``alpha / rank * up @ down`` in fp32."""
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())


@dataclass
class Resized:
    """A resized file's tensors and metadata, and per layer: its rank, its new rank, the squared
    singular values in all and those kept."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    ranks: dict[str, tuple[int, int]] = field(default_factory=dict)
    squares: dict[str, tuple[float, float]] = field(default_factory=dict)  # (all, kept)

    def layer_energy(self, module: str) -> float:
        total, kept = self.squares[module]
        return kept / total if total else 1.0

    @property
    def energy(self) -> float:
        """The energy kept over every layer together."""
        total = sum(t for t, _ in self.squares.values())
        return sum(k for _, k in self.squares.values()) / total if total else 1.0


def factors(
    change: torch.Tensor, keep: Callable[[torch.Tensor], int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``change`` (fp32) as ``up @ down`` of the rank ``keep(squared singular values)`` chooses: the
    best change of that rank (Eckart-Young), ``sqrt(s)`` on each side. Returns (down, up, squares)."""
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    squares = s.square()
    rank = keep(squares)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous(), squares


def refuse_not_low_rank(metadata: dict[str, str], source: str, adapter_types: dict[str, Any]) -> None:
    """One line when the file's training record names an adapter type whose record says its change
    is not one product B @ A (``AdapterInfo.low_rank``); files without a record are judged by their
    keys (:func:`low_rank_layers`)."""
    from tuner.core.model.lora import METADATA_KEY

    kind = json.loads(metadata[METADATA_KEY]).get("lora_type") if METADATA_KEY in metadata else None
    adapter = adapter_types.get(kind) if kind else None
    if adapter is not None and not adapter.low_rank:
        handled = ", ".join(name for name, info in adapter_types.items() if info.low_rank)
        raise DataError(
            f"{source}: a {kind} file ({adapter.description}): only low-rank types (a product B @ A per layer: "
            f"{handled}) can be resized, merged or converted this way"
        )


def low_rank_layers(
    tensors: dict[str, torch.Tensor], source: str
) -> tuple[list[LowRankLayer], dict[str, torch.Tensor]]:
    """The file's low-rank layers, and the tensors that are not part of one (kept as they are).
    One-line errors name ``source`` for a type that is not low rank or a pair that does not fit."""
    for part, kind in NOT_LOW_RANK.items():
        if any(part in key for key in tensors):
            raise DataError(f"{source}: a {kind} file: only LoRA files (a product B @ A per layer) can be resized")
    layers, used = [], set()
    for key in sorted(tensors):
        for down_end, up_end in PAIRS:
            if not key.endswith(down_end):
                continue
            module = key[: -len(down_end)]
            up_key = module + up_end
            if up_key not in tensors:
                raise DataError(f"{source}: {key} has no {up_end.lstrip('.')} beside it")
            down, up = tensors[key], tensors[up_key]
            if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                raise DataError(
                    f"{source}: {module}: {down_end.lstrip('.')} {list(down.shape)} and {up_end.lstrip('.')} "
                    f"{list(up.shape)} are not a low-rank pair of Linear weights"
                )
            alpha_key = module + ".alpha" if module + ".alpha" in tensors else None
            alpha = float(tensors[alpha_key]) if alpha_key else float(down.shape[0])
            layers.append(LowRankLayer(module, key, up_key, alpha_key, down, up, alpha))
            used |= {key, up_key, *([alpha_key] if alpha_key else [])}
    if not layers:
        raise DataError(f"{source}: no LoRA layers (lora_A/lora_B or lora_down/lora_up pairs) in it")
    return layers, {k: v for k, v in tensors.items() if k not in used}


def resize(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    source: str,
    rank: int | None = None,
    energy: float | None = None,
) -> Resized:
    """Each layer at ``rank`` (at most its own), or at the smallest rank keeping ``energy`` of its
    squared singular values. The scale goes into the factors (``sqrt(s)`` on each side) and alpha
    becomes the new rank, so ``alpha / rank`` is 1 for every reader; tensors keep their dtype."""
    if (rank is None) == (energy is None):
        raise DataError("give --rank R or --energy E (0 < E <= 1), one of them")
    if rank is not None and rank < 1:
        raise DataError(f"--rank {rank}: a rank is at least 1")
    if energy is not None and not 0 < energy <= 1:
        raise DataError(f"--energy {energy}: the share of energy to keep is above 0 and at most 1")
    layers, others = low_rank_layers(tensors, source)
    result = Resized(dict(others), dict(metadata))
    for layer in layers:

        def chosen(squares: torch.Tensor, own: int = layer.rank) -> int:
            if rank is not None:
                return min(rank, own)
            reached = (squares.cumsum(0) >= energy * float(squares.sum()) * (1 - 1e-6)).nonzero()
            return min(int(reached[0]) + 1 if len(reached) else own, own)

        down, up, squares = factors(layer.change(), chosen)
        keep, total = down.shape[0], float(squares.sum())
        result.tensors[layer.up_key] = up.to(layer.up.dtype)
        result.tensors[layer.down_key] = down.to(layer.down.dtype)
        if layer.alpha_key:
            result.tensors[layer.alpha_key] = torch.tensor(float(keep), dtype=tensors[layer.alpha_key].dtype)
        # without an .alpha tensor readers take alpha = rank: scale 1, as the factors now need
        result.squares[layer.module] = (total, float(squares[:keep].sum()))
        result.ranks[layer.module] = (layer.rank, keep)
    result.metadata = _resized_metadata(metadata, result)
    return result


def _resized_metadata(metadata: dict[str, str], result: Resized) -> dict[str, str]:
    """The file's metadata with the ranks it now has: tuner's training record (``rank``, ``alpha``;
    the rank before as ``resized_from``) and peft's adapter config where diffusers wrote one."""
    from tuner.core.model.lora import METADATA_KEY

    updated = dict(metadata)
    ranks = sorted({new for _, new in result.ranks.values()})
    if METADATA_KEY in updated:
        record = json.loads(updated[METADATA_KEY])
        record["resized_from"] = record.get("rank")
        record["rank"] = ranks[-1]
        record["alpha"] = float(ranks[-1])
        if len(ranks) > 1:
            record["ranks"] = {module: new for module, (_, new) in result.ranks.items()}
        updated[METADATA_KEY] = json.dumps(record, sort_keys=True)
    if "lora_adapter_metadata" in updated:  # diffusers' copy of the peft config
        config = json.loads(updated["lora_adapter_metadata"])
        config["r"] = config["lora_alpha"] = ranks[-1]
        if len(ranks) > 1:
            config["rank_pattern"] = {m: new for m, (_, new) in result.ranks.items()}
            config["alpha_pattern"] = dict(config["rank_pattern"])
        updated["lora_adapter_metadata"] = json.dumps(config)
    return updated


def merge(files: list[tuple[dict[str, torch.Tensor], dict[str, str], str, float]]) -> Resized:
    """Several LoRA files of one model (``(tensors, metadata, source, weight)`` each) as one: per
    layer ``sum(weight * alpha / rank * B @ A)``, exactly, by stacking the factors (the ranks add
    up; :func:`resize` brings them down). Layers in only some files are kept with their weight. A
    layer whose shapes differ between files, or files of different layouts, are refused in one line."""
    if not files:
        raise DataError("name at least one LoRA file to merge")
    from tuner.core.model.lora import METADATA_KEY

    families = {
        source: json.loads(metadata[METADATA_KEY]).get("model_family")
        for _, metadata, source, _ in files
        if METADATA_KEY in metadata
    }
    if len({family for family in families.values() if family}) > 1:
        named = ", ".join(f"{source} ({family})" for source, family in families.items())
        raise DataError(f"the files are LoRAs of different model families: {named}")
    merged: dict[str, list[tuple[LowRankLayer, float, str]]] = {}
    layouts = {}
    for tensors, _, source, weight in files:
        layers, _ = low_rank_layers(tensors, source)
        layouts[source] = "lora_A/lora_B" if layers[0].down_key.endswith(".lora_A.weight") else "lora_down/lora_up"
        for layer in layers:
            merged.setdefault(layer.module, []).append((layer, weight, source))
    if len(set(layouts.values())) > 1:
        named = ", ".join(f"{source} ({layout})" for source, layout in layouts.items())
        raise DataError(f"the files are in different layouts: {named}; convert them to one first")
    result = Resized({}, dict(files[0][1]))
    for module, parts in merged.items():
        first, _, first_source = parts[0]
        for layer, _, source in parts[1:]:
            if (layer.down.shape[1], layer.up.shape[0]) != (first.down.shape[1], first.up.shape[0]):
                raise DataError(
                    f"{source}: {module} maps {layer.down.shape[1]} to {layer.up.shape[0]} features, "
                    f"{first_source}: {first.down.shape[1]} to {first.up.shape[0]}: not LoRAs of one model"
                )
        downs = [layer.down.float() for layer, _, _ in parts]
        ups = [(weight * layer.alpha / layer.rank) * layer.up.float() for layer, weight, _ in parts]
        rank = sum(down.shape[0] for down in downs)
        result.tensors[first.down_key] = torch.cat(downs).to(first.down.dtype)
        result.tensors[first.up_key] = torch.cat(ups, dim=1).to(first.up.dtype)
        if first.alpha_key:
            result.tensors[first.alpha_key] = torch.tensor(float(rank))
        result.ranks[module] = (first.rank, rank)
    result.metadata = _merged_metadata(result.metadata, [(source, weight) for _, _, source, weight in files], result)
    return result


def _merged_metadata(metadata: dict[str, str], sources: list[tuple[str, float]], result: Resized) -> dict[str, str]:
    from tuner.core.model.lora import METADATA_KEY

    updated = _resized_metadata(metadata, result)
    if METADATA_KEY in updated:
        record = json.loads(updated[METADATA_KEY])
        record.pop("resized_from", None)
        record["merged_from"] = [{"file": source, "weight": weight} for source, weight in sources]
        updated[METADATA_KEY] = json.dumps(record, sort_keys=True)
    return updated


def extract(base_folder: str, tuned_folder: str, rank: int, source: dict[str, str]) -> Resized:
    """A LoRA (diffusers layout) from the difference of two checkpoints of one model: each 2-D
    ``.weight`` that differs, the difference taken in fp32 (a bf16 difference loses a LoRA-sized
    change), at its best rank ``rank`` by its singular values. Tensor by tensor: never either model
    whole in memory. ``source`` goes into the file's training record."""
    from pathlib import Path

    from tuner.core.model.lora import METADATA_KEY
    from tuner.core.model.quantize import WeightFiles

    if rank < 1:
        raise DataError(f"--rank {rank}: a rank is at least 1")
    base, tuned = WeightFiles(_transformer_folder(base_folder)), WeightFiles(_transformer_folder(tuned_folder))
    result = Resized({}, {})
    missing = [name for name in base.where if name not in tuned.where]
    if len(missing) == len(base.where):
        raise DataError(f"{tuned_folder} shares no weight names with {base_folder}: not a checkpoint of that model")
    from tqdm.auto import tqdm

    for name in tqdm(sorted(set(base.where) & set(tuned.where)), desc="extract", unit="tensor", leave=False):
        if not name.endswith(".weight"):
            continue
        before, after = base.read([name])[name], tuned.read([name])[name]
        if before.dim() != 2:
            continue
        if before.shape != after.shape:
            raise DataError(f"{tuned_folder}: {name} is {list(after.shape)}, {list(before.shape)} in {base_folder}")
        difference = after.float() - before.float()
        if not difference.any():
            continue
        down, up, squares = factors(difference, lambda squares: min(rank, len(squares)))
        keep = down.shape[0]
        module = "transformer." + name[: -len(".weight")]
        result.tensors[module + ".lora_A.weight"], result.tensors[module + ".lora_B.weight"] = down, up
        result.tensors[module + ".alpha"] = torch.tensor(float(keep))
        result.squares[module] = (float(squares.sum()), float(squares[:keep].sum()))
        result.ranks[module] = (len(squares), keep)
    if not result.ranks:
        raise DataError(f"{tuned_folder}: no 2-D weight differs from {base_folder}: nothing to extract")
    record = {"lora_type": "lora", "rank": rank, "alpha": float(rank), "base_model": str(Path(base_folder)), **source}
    result.metadata = {METADATA_KEY: json.dumps(record, sort_keys=True)}
    return result


def _transformer_folder(folder: str):
    """The denoiser's weights of a diffusers pipeline folder (``transformer/``) or a model folder."""
    from pathlib import Path

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"{folder}: not a folder; give a local diffusers model (the pipeline or its transformer/)")
    return path / "transformer" if (path / "transformer").is_dir() else path


SHARD_BYTES = 5 * 2**30  # diffusers' own default shard size for save_pretrained


def fuse_into_base(
    tensors: dict[str, torch.Tensor], source: str, base_folder: str, out: str, shard_bytes: int = SHARD_BYTES
) -> tuple[int, int]:
    """The base model's denoiser with the LoRA folded in (``W + alpha / r * B @ A``, added in fp32,
    stored in the weight's dtype), written as a diffusers model folder (``config.json`` and the
    weights, sharded with an index past ``shard_bytes``) into ``out``, which must not exist yet; it
    appears whole or not at all. Tensor by tensor: the base is never in memory twice. Returns
    (layers fused, tensors written)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from tuner.core.model.quantize import WeightFiles

    layers, _ = low_rank_layers(tensors, source)
    foreign = [layer.module for layer in layers if not layer.module.startswith("transformer.")]
    if foreign or not layers[0].down_key.endswith(".lora_A.weight"):
        raise DataError(f"{source}: not in the diffusers layout (transformer.<module>.lora_A); convert it first")
    by_weight = {layer.module[len("transformer.") :] + ".weight": layer for layer in layers}
    folder = _transformer_folder(base_folder)
    base = WeightFiles(folder)
    absent = sorted(set(by_weight) - set(base.where))
    if absent:
        raise DataError(f"{source}: {absent[0]} is not a weight of {base_folder}: a LoRA of another model")
    target = Path(out)
    if target.exists():
        raise DataError(f"--out {out} exists; name a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        written: list[list[str]] = []  # the tensor names of each shard written
        shard: dict[str, torch.Tensor] = {}
        size = total = 0

        def flush() -> None:  # one shard in memory at a time, named once their number is known
            save_file(shard, str(work / f"shard-{len(written)}.safetensors"), metadata={"format": "pt"})
            written.append(list(shard))
            shard.clear()

        from tqdm.auto import tqdm

        for name in tqdm(sorted(base.where), desc="fold into base", unit="tensor", leave=False):
            weight = base.read([name])[name]
            layer = by_weight.get(name)
            if layer is not None:
                weight = (weight.float() + layer.change()).to(weight.dtype)
            nbytes = weight.numel() * weight.element_size()
            if size and size + nbytes > shard_bytes:
                flush()
                size = 0
            shard[name] = weight.contiguous()
            size, total = size + nbytes, total + nbytes
        flush()
        count = len(written)
        names = (
            ["diffusion_pytorch_model.safetensors"]
            if count == 1
            else [f"diffusion_pytorch_model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        for number, file in enumerate(names):
            os.replace(work / f"shard-{number}.safetensors", work / file)
        if count > 1:
            weight_map = {name: file for tensors_in, file in zip(written, names, strict=True) for name in tensors_in}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (work / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        shutil.copyfile(folder / "config.json", work / "config.json")
        os.replace(work, target)  # the folder appears whole
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return len(by_weight), sum(len(names_in) for names_in in written)


def export_of(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, alpha_in: str):
    """A diffusers-layout file (``transformer.<module>.lora_A``) as the export a format writes from."""
    from tuner.core.host.records import LoraExport
    from tuner.core.model.lora import METADATA_KEY

    layers, _ = low_rank_layers(tensors, source)
    if not all(
        layer.module.startswith("transformer.") and layer.down_key.endswith(".lora_A.weight") for layer in layers
    ):
        raise DataError(f"{source}: not in the diffusers layout (transformer.<module>.lora_A/lora_B)")
    ranks = {layer.rank for layer in layers}
    if len(ranks) > 1:
        raise DataError(
            f"{source}: its layers have ranks {sorted(ranks)}; a fused layout needs one rank: "
            "tuner lora resize --rank R first"
        )
    state, alphas = {}, {}
    for layer in layers:
        module = layer.module[len("transformer.") :]
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = layer.down, layer.up
        alphas[module] = layer.alpha
    record = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    return LoraExport(state, ranks.pop(), alphas, record, alpha_in)


def export_from_changes(deltas: dict[str, torch.Tensor], metadata: dict[str, str], alpha_in: str):
    """Changes per module (a runtime's reading of a file) as factors again: each at its own rank,
    the singular values above fp32 rounding, so the factors multiply back to the change."""
    from tuner.core.host.records import LoraExport
    from tuner.core.model.lora import METADATA_KEY

    state, alphas, ranks = {}, {}, set()
    for module, delta in deltas.items():
        if not delta.any():  # a module a fused layer covers without changing it (ComfyUI's q/k/v)
            continue
        # its own rank: the singular values above fp32 rounding (squared: 1e-12 of the largest)
        down, up, _ = factors(delta.float(), lambda squares: int((squares > squares[0] * 1e-12).sum()))
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = down, up
        alphas[module] = float(down.shape[0])
        ranks.add(down.shape[0])
    record = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else {}
    return LoraExport(state, max(ranks), alphas, record, alpha_in)
