"""`tuner lora resize`: each layer's change by its singular values in fp32, exact at the layer's own
rank and the best change of a smaller one (Eckart-Young), in every layout tuner writes; types that
are not one product B @ A are refused in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from tuner.core.cli import app
from tuner.core.errors import DataError
from tuner.core.outputs.lora_tools import low_rank_layers, resize

from .conftest import base_settings, make_host, train


def random_lora(rank=6, alpha=3.0, layout="diffusers") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    down, up = ("lora_A", "lora_B") if layout == "diffusers" else ("lora_down", "lora_up")
    tensors = {}
    for name, (out_features, in_features) in {"blocks.0.to_q": (24, 16), "blocks.1.proj": (16, 40)}.items():
        tensors[f"transformer.{name}.{down}.weight"] = torch.randn(rank, in_features)
        tensors[f"transformer.{name}.{up}.weight"] = torch.randn(out_features, rank)
        if layout == "diffusers":  # the other layout without .alpha: readers take alpha = rank
            tensors[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    return tensors


def changes(tensors, source="test"):
    layers, _ = low_rank_layers(tensors, source)
    return {layer.module: layer.change() for layer in layers}


@pytest.mark.parametrize("layout", ["diffusers", "comfyui"])
def test_resizing_is_exact_at_the_own_rank_and_the_best_of_a_smaller_one(layout):
    tensors = random_lora(layout=layout)
    before = changes(tensors)
    same = resize(tensors, {}, "test", rank=6)
    for module, change in changes(same.tensors).items():
        torch.testing.assert_close(change, before[module], atol=1e-5, rtol=1e-5)
    assert same.energy == pytest.approx(1.0)
    smaller = resize(tensors, {}, "test", rank=2)
    for module, change in changes(smaller.tensors).items():
        s = torch.linalg.svdvals(before[module])
        # the error of the best rank-2 change is exactly the energy of the values left out
        assert (change - before[module]).square().sum() == pytest.approx(float(s[2:].square().sum()), rel=1e-4)
        assert smaller.ranks[module] == (6, 2)
        assert smaller.layer_energy(module) == pytest.approx(float(s[:2].square().sum() / s.square().sum()), rel=1e-5)
    if layout == "diffusers":  # alpha is the new rank: scale 1, the scale is in the factors
        assert all(float(v) == 2.0 for k, v in smaller.tensors.items() if k.endswith(".alpha"))
    by_energy = resize(tensors, {}, "test", energy=0.9)
    for module, (_, new) in by_energy.ranks.items():
        s2 = torch.linalg.svdvals(before[module]).square()
        shares = (s2.cumsum(0) / s2.sum()).tolist()
        assert shares[new - 1] >= 0.9 - 1e-6 and (new == 1 or shares[new - 2] < 0.9)


def test_not_low_rank_files_and_bad_requests_are_one_line():
    tensors = random_lora()
    dora = {**tensors, "transformer.blocks.0.to_q.lora_magnitude_vector": torch.ones(24)}
    with pytest.raises(DataError, match=r"^x.safetensors: a DoRA .* file: only LoRA files .* can be resized$"):
        resize(dora, {}, "x.safetensors", rank=2)
    broken = {k: v for k, v in tensors.items() if "blocks.1.proj.lora_B" not in k}
    with pytest.raises(DataError, match=r"transformer.blocks.1.proj.lora_A.weight has no lora_B.weight beside it"):
        resize(broken, {}, "x.safetensors", rank=2)
    with pytest.raises(DataError, match="give --rank R or --energy E"):
        resize(tensors, {}, "x.safetensors")


def test_a_trained_lora_resized_in_both_layouts_loads_as_its_runtime_reads_it(tiny_chroma, shapes_dir, tmp_path):
    """The commands on tuner's own files: each resized or merged file passes check-lora; in the diffusers
    layout the runtime reader sees each module's best rank-2 change, in ComfyUI's (q, k, v fused at
    rank 3r) a resize at the layers' own ranks reads back exactly."""
    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 3, "network_rank": 4,
                "learning_rate": 1e-2, "lora_format": "all"}  # fmt: skip
    result, host, config = train(settings)
    transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    runner = CliRunner()
    for path in result.lora_files:
        fmt = "comfyui" if "comfyui" in path.name else "diffusers"
        reader = make_host().lora_formats[fmt].read
        before = reader(str(path), transformer, host.family).deltas
        for rank in (2, 12):
            out = tmp_path / f"resized-{rank}-{path.name}"
            done = runner.invoke(app, ["lora", "resize", str(path), "--rank", str(rank), "--out", str(out)])
            assert done.exit_code == 0, done.output
            assert "; energy kept" in done.output
            checked = runner.invoke(app, ["check-lora", str(out), "--plugin", "chroma", "--format", fmt])
            assert checked.exit_code == 0 and "OK: every key loads" in checked.output, checked.output
            after = reader(str(out), transformer, host.family).deltas
            assert before.keys() == after.keys()
            for module, delta in before.items():
                if rank == 12:  # every layer at its own rank (or less): the same changes
                    torch.testing.assert_close(after[module], delta, atol=1e-5, rtol=1e-4)
                elif fmt == "diffusers":  # one module a layer: its best rank-2 change
                    tail = torch.linalg.svdvals(delta.float())[2:].square().sum()
                    assert (after[module] - delta).square().sum() == pytest.approx(float(tail), rel=1e-3, abs=1e-10)
        halves = tmp_path / f"halves-{path.name}"  # a LoRA merged with itself at half weight each: itself
        done = runner.invoke(app, ["lora", "merge", f"{path}:0.5", f"{path}:0.5", "--out", str(halves)])
        assert done.exit_code == 0, done.output
        checked = runner.invoke(app, ["check-lora", str(halves), "--plugin", "chroma", "--format", fmt])
        assert checked.exit_code == 0 and "OK: every key loads" in checked.output, checked.output
        for module, delta in reader(str(halves), transformer, host.family).deltas.items():
            torch.testing.assert_close(delta, before[module], atol=1e-5, rtol=1e-4)
    assert runner.invoke(app, ["lora", "resize", str(path), "--rank", "2", "--out", str(path)]).exit_code != 0


def test_a_file_without_lora_layers_is_named(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({"something.weight": torch.ones(2)}, str(path))
    done = CliRunner().invoke(
        app, ["lora", "resize", str(path), "--rank", "2", "--out", str(tmp_path / "o.safetensors")]
    )
    assert isinstance(done.exception, DataError) and str(done.exception).startswith(f"{path}: no LoRA layers")


def test_merging_sums_the_weighted_changes_exactly_and_refuses_files_of_other_models(tmp_path):
    from tuner.core.outputs.lora_tools import merge

    a, b = random_lora(rank=6, alpha=3.0), random_lora(rank=2, alpha=4.0)
    b = {k: v * 0.5 + 0.1 for k, v in b.items()}  # another LoRA of the same layers
    expected = {m: 0.7 * changes(a)[m] + 0.3 * changes(b)[m] for m in changes(a)}
    merged = merge([(a, {}, "a", 0.7), (b, {}, "b", 0.3)])
    for module, change in changes(merged.tensors).items():
        torch.testing.assert_close(change, expected[module], atol=1e-5, rtol=1e-5)
        assert merged.ranks[module] == (6, 8)  # exact: the ranks add up
    paths = []
    for name, tensors in (("a", a), ("b", b)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        paths.append(str(tmp_path / f"{name}.safetensors"))
    out = tmp_path / "merged.safetensors"
    done = CliRunner().invoke(
        app, ["lora", "merge", f"{paths[0]}:0.7", f"{paths[1]}:0.3", "--rank", "3", "--out", str(out)]
    )
    assert done.exit_code == 0 and "rank 8 -> 3" in done.output, done.output
    for module, change in changes(load_file(out)).items():  # the best rank-3 change of the sum
        tail = torch.linalg.svdvals(expected[module])[3:].square().sum()
        assert (change - expected[module]).square().sum() == pytest.approx(float(tail), rel=1e-3)
    wider = {
        k: torch.randn(v.shape[0], v.shape[1] + 1) if k.endswith("proj.lora_A.weight") else v for k, v in b.items()
    }
    with pytest.raises(
        DataError, match=r"^b: transformer.blocks.1.proj maps 41 to 16 features, a: 40 to 16: not LoRAs of one model$"
    ):
        merge([(a, {}, "a", 1.0), (wider, {}, "b", 1.0)])
    record = {"tuner_training": '{"model_family": "chroma"}'}
    with pytest.raises(DataError, match=r"^the files are LoRAs of different model families: a \(chroma\), f \(flux\)$"):
        merge([(a, record, "a", 1.0), (b, {"tuner_training": '{"model_family": "flux"}'}, "f", 1.0)])
    with pytest.raises(
        DataError, match=r"^the files are in different layouts: a \(lora_A/lora_B\), c \(lora_down/lora_up\)"
    ):
        merge([(a, {}, "a", 1.0), (random_lora(layout="comfyui"), {}, "c", 1.0)])


def test_extracting_from_base_plus_a_known_lora_recovers_it(tiny_chroma, tmp_path):
    """A fine-tune made by adding a known rank-2 change to three Linear weights: extract at rank 2
    gives those changes back (fp32), at rank 1 their best rank-1 parts; the file passes check-lora."""
    import shutil

    shutil.copytree(tiny_chroma, tmp_path / "tuned")
    weights = tmp_path / "tuned" / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    torch.manual_seed(1)
    names = [n for n in sorted(tensors) if n.endswith(("to_q.weight", "proj_mlp.weight")) and tensors[n].dim() == 2][:3]
    known = {}
    for name in names:
        out_features, in_features = tensors[name].shape
        known["transformer." + name[: -len(".weight")]] = change = torch.randn(out_features, 2) @ torch.randn(
            2, in_features
        )
        tensors[name] = tensors[name] + change.to(tensors[name].dtype)
    save_file(tensors, str(weights))
    runner = CliRunner()
    for rank in (2, 1):
        out = tmp_path / f"extracted-{rank}.safetensors"
        done = runner.invoke(app, ["lora", "extract", "--model", str(tiny_chroma), "--tuned", str(tmp_path / "tuned"),
                                   "--rank", str(rank), "--out", str(out)])  # fmt: skip
        assert done.exit_code == 0, done.output
        found = changes(load_file(out))
        assert found.keys() == known.keys()  # only what changed
        for module, change in known.items():
            if rank == 2:
                torch.testing.assert_close(found[module], change, atol=1e-4, rtol=1e-4)
            else:
                tail = torch.linalg.svdvals(change)[1:].square().sum()
                assert (found[module] - change).square().sum() == pytest.approx(float(tail), rel=1e-3)
    checked = runner.invoke(app, ["check-lora", str(tmp_path / "extracted-2.safetensors"), "--plugin", "chroma"])
    assert checked.exit_code == 0 and "OK: every key loads" in checked.output, checked.output
    same = runner.invoke(app, ["lora", "extract", "--model", str(tiny_chroma), "--tuned", str(tiny_chroma), "--rank", "2",
                               "--out", str(tmp_path / "none.safetensors")])  # fmt: skip
    assert isinstance(same.exception, DataError) and "no 2-D weight differs" in str(same.exception)


def test_folding_into_the_base_equals_diffusers_own_fuse_lora_sharded_or_not(tiny_chroma, shapes_dir, tmp_path):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    from tuner.core.outputs.lora_tools import fuse_into_base

    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 3, "learning_rate": 1e-2}
    result, _, _ = train(settings)
    lora = result.lora_files[0]
    out = tmp_path / "fused"
    done = CliRunner().invoke(
        app, ["lora", "merge", str(lora), "--into-base", "--model", str(tiny_chroma), "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    pipe = ChromaPipeline.from_pretrained(tiny_chroma, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    expected = pipe.transformer.state_dict()
    ours = ChromaTransformer2DModel.from_pretrained(out).state_dict()
    assert ours.keys() == expected.keys()
    changed = 0
    base = ChromaTransformer2DModel.from_pretrained(tiny_chroma, subfolder="transformer").state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=1e-5)
        changed += not torch.equal(value, base[key])
    assert changed == 14  # the LoRA's layers, and only they
    sharded = tmp_path / "sharded"  # past the shard size: shards and an index, as diffusers writes them
    fuse_into_base(load_file(lora), str(lora), str(tiny_chroma), str(sharded), shard_bytes=100_000)
    assert (
        len(list(sharded.glob("*.safetensors"))) > 1
        and (sharded / "diffusion_pytorch_model.safetensors.index.json").exists()
    )
    resharded = ChromaTransformer2DModel.from_pretrained(sharded).state_dict()
    assert all(torch.equal(resharded[k], ours[k]) for k in ours)
    with pytest.raises(DataError, match="exists; name a new folder"):
        fuse_into_base(load_file(lora), str(lora), str(tiny_chroma), str(sharded))


def test_converting_between_layouts_is_exact_and_passes_check_lora(tiny_chroma, shapes_dir, tmp_path):
    """diffusers -> ComfyUI writes what training writes for ComfyUI (q/k/v fused at rank 3r); ComfyUI
    -> diffusers factors each module's change again, the same changes to fp32 rounding."""
    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "max_train_steps": 3, "learning_rate": 1e-2,
                "lora_format": "all"}  # fmt: skip
    result, host, config = train(settings)
    diffusers_file, comfyui_file = sorted(result.lora_files, key=lambda p: "comfyui" in p.name)
    runner = CliRunner()

    def convert(path, to, out):
        done = runner.invoke(app, ["lora", "convert", str(path), "--to", to, "--plugin", "chroma", "--out", str(out)])
        assert done.exit_code == 0, done.output
        checked = runner.invoke(app, ["check-lora", str(out), "--plugin", "chroma", "--format", to])
        assert checked.exit_code == 0 and "OK: every key loads" in checked.output, checked.output
        return out

    to_comfyui = load_file(convert(diffusers_file, "comfyui", tmp_path / "c.safetensors"))
    trained = load_file(comfyui_file)
    assert to_comfyui.keys() == trained.keys() and all(torch.equal(to_comfyui[k], trained[k]) for k in trained)
    back = convert(comfyui_file, "diffusers", tmp_path / "d.safetensors")
    transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    reader = host.lora_formats["diffusers"].read
    before, after = (
        reader(str(diffusers_file), transformer, host.family).deltas,
        reader(str(back), transformer, host.family).deltas,
    )
    assert before.keys() == after.keys()
    for module, delta in before.items():
        torch.testing.assert_close(after[module], delta, atol=1e-6, rtol=1e-4)
    again = runner.invoke(app, ["lora", "convert", str(back), "--to", "diffusers", "--plugin", "chroma", "--out",
                                str(tmp_path / "e.safetensors")])  # fmt: skip
    assert isinstance(again.exception, DataError) and "in the diffusers layout already" in str(again.exception)
    mixed = tmp_path / "mixed.safetensors"
    assert (
        runner.invoke(app, ["lora", "resize", str(diffusers_file), "--energy", "0.5", "--out", str(mixed)]).exit_code
        == 0
    )
    refused = runner.invoke(app, ["lora", "convert", str(mixed), "--to", "comfyui", "--plugin", "chroma", "--out",
                                  str(tmp_path / "f.safetensors")])  # fmt: skip
    assert isinstance(refused.exception, DataError) and "a fused layout needs one rank" in str(refused.exception)


def test_a_file_whose_record_names_a_type_that_is_not_low_rank_is_refused_by_its_record(tmp_path):
    """The adapter records say which types the tools handle (AdapterInfo.low_rank): a LoKr file
    named so in its training record is refused even if its keys looked like pairs."""
    path = tmp_path / "lokr.safetensors"
    save_file(random_lora(), str(path), metadata={"tuner_training": '{"lora_type": "lokr"}'})
    done = CliRunner().invoke(
        app, ["lora", "resize", str(path), "--rank", "2", "--out", str(tmp_path / "o.safetensors")]
    )
    assert isinstance(done.exception, DataError)
    assert str(done.exception).startswith(f"{path}: a lokr file (") and "only low-rank types" in str(done.exception)
    assert "\n" not in str(done.exception)
