"""LoRA files that load: diffusers and ComfyUI layouts, the self-test after every save, check-lora."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuner.core import hookimpl
from tuner.core.builtin.defaults import DIFFUSERS_FORMAT
from tuner.core.errors import ConfigError
from tuner.core.host.records import FamilyInfo, LoraFormat
from tuner.core.model.selftest import SelfTestFailed, adapter_deltas
from tuner.core.run.trainer import Trainer

from .conftest import REPO, base_settings, make_config, make_host


def trained(tmp_path, model, data, family="chroma", *plugins, **extra):
    settings = base_settings(model, data, tmp_path, family)
    settings.update(
        max_train_steps=4,
        learning_rate=5e-3,
        lora_alpha=12,
        network_rank=4,
        lora_format="both",
        flux_lora_target="all+ffs",
    )
    settings.update(extra)
    host = make_host(*plugins, family=family)
    trainer = Trainer(host, make_config(host, settings), warn=lambda m: None)
    return trainer, trainer.train()


def check_lora(path, model, family="chroma", in_process=True):
    """``tuner check-lora`` on ``path``: (exit code, output); in a process of its own when the exit
    status a shell sees is what is tested."""
    args = ["check-lora", str(path), "--plugin", family, "--model", str(model)]
    if in_process:
        from typer.testing import CliRunner

        from tuner.core.cli import app

        out = CliRunner().invoke(app, args)
        return out.exit_code, out.output
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", *args], cwd=REPO, capture_output=True, text=True, env=env
    )
    return out.returncode, out.stdout + out.stderr


def test_both_formats_are_written_and_pass_their_self_test(tiny_chroma, shapes_dir, tmp_path):
    trainer, result = trained(tmp_path, tiny_chroma, shapes_dir)
    names = sorted(p.name for p in result.lora_files)
    assert names == ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_comfyui.safetensors"]
    comfy = load_file(tmp_path / "out" / "pytorch_lora_weights_comfyui.safetensors")
    assert all(k.startswith("diffusion_model.") for k in comfy)
    # fused q/k/v (+mlp in single blocks) as a block LoRA of rank k*r, alpha scaled by k
    qkv = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert comfy[f"{qkv}.lora_A.weight"].shape == (12, 32) and comfy[f"{qkv}.lora_B.weight"].shape == (96, 12)
    assert float(comfy[f"{qkv}.alpha"]) == 36.0
    linear1 = "diffusion_model.single_blocks.1.linear1"
    assert comfy[f"{linear1}.lora_A.weight"].shape == (16, 32) and float(comfy[f"{linear1}.alpha"]) == 48.0
    assert {
        "diffusion_model.final_layer.linear.alpha",
        "diffusion_model.single_blocks.0.linear2.alpha",
        "diffusion_model.double_blocks.0.txt_mlp.2.alpha",
    } <= set(comfy)
    # ComfyUI's arithmetic on the fused weight: rows of k equal the trained k delta
    deltas = adapter_deltas(trainer.model)
    fused = (
        float(comfy[f"{linear1}.alpha"]) / 16 * comfy[f"{linear1}.lora_B.weight"] @ comfy[f"{linear1}.lora_A.weight"]
    )
    torch.testing.assert_close(fused[32:64], deltas["single_transformer_blocks.1.attn.to_k"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused[96:], deltas["single_transformer_blocks.1.proj_mlp"], atol=1e-6, rtol=1e-5)


def test_flux_comfyui_file_covers_modulation_and_passes_the_self_test(tiny_flux, shapes_dir, tmp_path):
    _, result = trained(
        tmp_path, tiny_flux, shapes_dir, "flux", flux_lora_target=["to_q", "norm1.linear", "norm_out.linear"]
    )
    comfy = load_file(tmp_path / "out" / "pytorch_lora_weights_comfyui.safetensors")
    assert {
        "diffusion_model.double_blocks.0.img_mod.lin.alpha",
        "diffusion_model.final_layer.adaLN_modulation.1.alpha",
    } <= set(comfy)


class BrokenFormat:
    """A plugin registering its own format, "broken": the diffusers file with one fault, read back by
    the diffusers reader. The self-test must catch the fault."""

    def __init__(self, how):
        self.how = how

    @hookimpl
    def register_lora_formats(self, register):
        def export(export, transformer):
            tensors = dict(DIFFUSERS_FORMAT.export(export, transformer)["pytorch_lora_weights.safetensors"])
            if self.how == "rename":
                key = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
                tensors[key.replace("to_q", "to_qq")] = tensors.pop(key)
            else:  # forget the alphas: diffusers then assumes alpha = rank
                tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
            return {"broken_lora.safetensors": tensors}

        register(LoraFormat("broken", "a faulty converter", export=export, read=DIFFUSERS_FORMAT.read))


@pytest.mark.parametrize(("how", "message"), [("rename", "does not load key .*to_qq"), ("alpha", "off by")])
def test_the_self_test_fails_the_run_loudly(tiny_chroma, shapes_dir, tmp_path, how, message):
    with pytest.raises(SelfTestFailed, match=f"LoRA self-test failed: .*broken_lora.safetensors.*{message}"):
        trained(tmp_path, tiny_chroma, shapes_dir, "chroma", ("break", BrokenFormat(how)), lora_format="broken")


def test_a_format_registered_by_a_plugin_alone_is_written_and_checked(tiny_chroma, shapes_dir, tmp_path):
    """A format is one registration: `all` picks it up, the run writes it and self-tests it."""

    class Halves:  # the diffusers layout split into two files, read back as one
        @hookimpl
        def register_lora_formats(self, register):
            def export(export, transformer):
                tensors = DIFFUSERS_FORMAT.export(export, transformer)["pytorch_lora_weights.safetensors"]
                keys = sorted(tensors)
                half = len(keys) // 2
                return {
                    "halves_a.safetensors": {k: tensors[k] for k in keys[:half] if ".alpha" not in k},
                    "halves_b.safetensors": {k: tensors[k] for k in keys if k not in keys[:half] or ".alpha" in k},
                }

            def read(path, transformer, family):
                a, b = (Path(path).parent / f"halves_{x}.safetensors" for x in "ab")
                joined = Path(path).parent / "halves_joined.safetensors"
                save_file({**load_file(a), **load_file(b)}, joined)
                return DIFFUSERS_FORMAT.read(str(joined), transformer, family)

            register(LoraFormat("halves", "two files", export=export, read=read))

    _, result = trained(tmp_path, tiny_chroma, shapes_dir, "chroma", ("halves", Halves()), lora_format="all")
    names = sorted(p.name for p in result.lora_files)
    assert names == [
        "halves_a.safetensors",
        "halves_b.safetensors",
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_comfyui.safetensors",
    ]


def test_lora_format_names_what_the_family_writes(tiny_chroma, shapes_dir, tmp_path):
    from tuner.testing import make_host as kit_host

    sd3_like = kit_host(("fam", _FamilyOnly()), family="onlydiffusers")
    with pytest.raises(ConfigError, match=r"lora_format: 'both' means two formats, but onlydiffusers writes diffusers"):
        make_config(sd3_like, {"lora_format": "both"})
    with pytest.raises(ConfigError, match=r"lora_format: 'comfyui': choose from diffusers, or all"):
        make_config(sd3_like, {"lora_format": "comfyui"})
    assert make_config(sd3_like, {"lora_format": "all"}).lora_format == ["diffusers"]
    host = make_host()
    assert make_config(host, {"lora_format": "both"}).lora_format == ["diffusers", "comfyui"]


class _FamilyOnly:
    @hookimpl
    def register_families(self, register):
        register(FamilyInfo("onlydiffusers", "writes the core's format only", {"base": "x/y"}, "base"))


@pytest.mark.slow
def test_check_lora_accepts_good_files_and_flags_renamed_keys(tiny_chroma, shapes_dir, tmp_path):
    _, result = trained(tmp_path, tiny_chroma, shapes_dir)
    diffusers_file = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    comfy_file = tmp_path / "out" / "pytorch_lora_weights_comfyui.safetensors"
    for good in (diffusers_file, comfy_file):
        code, output = check_lora(good, tiny_chroma)
        assert code == 0 and "OK: every key loads" in output, output[-1500:]

    tensors = load_file(diffusers_file)
    key = "transformer.transformer_blocks.0.attn.to_k.lora_B.weight"
    tensors[key.replace("to_k", "to_kk")] = tensors.pop(key)
    renamed = tmp_path / "renamed.safetensors"
    save_file(tensors, renamed)
    code, output = check_lora(renamed, tiny_chroma, in_process=False)  # a shell sees the failure
    assert code == 1
    assert "not loaded: transformer.transformer_blocks.0.attn.to_kk.lora_B.weight" in output

    # what the reference trainer writes as "comfyui": diffusers names under diffusion_model.
    reference = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in load_file(diffusers_file).items()}
    wrong = tmp_path / "reference_comfyui.safetensors"
    save_file(reference, wrong)
    code, output = check_lora(wrong, tiny_chroma)
    assert code == 1 and f"FAIL: {len(reference)} keys would be ignored" in output


def test_check_lora_fails_files_that_load_but_do_not_fit(tiny_chroma, shapes_dir, tmp_path):
    """A lora_A wider than its layer (diffusers silently widens the layer, then inference fails), A
    and B of different ranks, and a NaN update: each a FAIL line naming the module, never a traceback
    or "changes nothing"."""
    import torch
    from typer.testing import CliRunner

    from tuner.core.cli import app

    _, result = trained(tmp_path, tiny_chroma, shapes_dir, lora_format="diffusers")
    good = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    module = "transformer.transformer_blocks.0.attn.to_k"
    down, up = good[f"{module}.lora_A.weight"], good[f"{module}.lora_B.weight"]

    def check(name, **changes):
        path = tmp_path / f"{name}.safetensors"
        save_file({**good, **changes}, path)
        return CliRunner().invoke(app, ["check-lora", str(path), "--plugin", "chroma", "--model", str(tiny_chroma)])

    # the README's own file: ComfyUI maps diffusers names onto its fused weights; with no --model the
    # base model is the one in the file's metadata
    diffusers_file = str(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    for command in (["--format", "comfyui", "--model", str(tiny_chroma)], []):
        out = CliRunner().invoke(app, ["check-lora", diffusers_file, "--plugin", "chroma", *command])
        assert out.exit_code == 0 and "OK: every key loads" in out.output, out.output
    assert f"base model: {tiny_chroma.resolve()} (from the file's tuner_training metadata" in out.output
    wide = check("wide", **{f"{module}.lora_A.weight": torch.cat([down, down], dim=1)})
    assert wide.exit_code == 1, wide.output
    width = down.shape[1]
    assert (
        f"  wrong shape: transformer_blocks.0.attn.to_k gets an update of [{up.shape[0]}, {2 * width}], its weight is [{up.shape[0]}, {width}]"
        in wide.output
    )
    assert "FAIL: 1 updates do not fit their layer" in wide.output

    ranks = check("ranks", **{f"{module}.lora_B.weight": torch.cat([up, up], dim=1)})
    assert ranks.exit_code == 1 and ranks.output.strip().splitlines()[-1].startswith("FAIL: ")
    assert "Traceback" not in ranks.output

    nan = check("nan", **{f"{module}.lora_B.weight": up * float("nan")})
    assert nan.exit_code == 1
    assert "  not finite: transformer_blocks.0.attn.to_k gets NaN or inf" in nan.output
    assert "FAIL: 1 updates are NaN or inf" in nan.output


def test_check_lora_offline_without_the_base_model_names_the_option_it_needs(tmp_path, monkeypatch):
    """No --model, a file without tuner's metadata, the flavour's repository not cached, offline: one
    line naming HF_HUB_OFFLINE, the repository and --model, before anything loads."""
    import torch
    from typer.testing import CliRunner

    from tuner.core.cli import app
    from tuner.core.errors import PluginError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    path = tmp_path / "lora.safetensors"
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(4, 8)}, path)
    out = CliRunner().invoke(app, ["check-lora", str(path), "--plugin", "chroma", "--flavour", "hd"])
    assert isinstance(out.exception, PluginError), out.output
    message = str(out.exception)
    assert "lodestones/Chroma1-HD is not in the local hub cache and HF_HUB_OFFLINE is set" in message
    assert message.endswith("pass --model FOLDER (a local copy of the base model)") and "\n" not in message
