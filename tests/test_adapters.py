"""Adapter types (lora_type): each trains, its file reloads as trained in the runtime that reads
it (diffusers for DoRA, ComfyUI's arithmetic for LoKr/LoHa), a resume is exact, a quantized base
works, and bad settings are one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from tuner.core.api import AdapterInfo, hookimpl
from tuner.core.errors import ConfigError
from tuner.core.model.adapters import read_lycoris, trained_deltas
from tuner.core.run.trainer import Trainer

from .conftest import base_settings, make_config, make_host, train
from .test_resume import assert_resume_is_exact
from .test_training import predict


def trained(settings):
    host = make_host()
    config = make_config(host, settings)
    trainer = Trainer(host, config, warn=lambda m: None)
    return trainer, trainer.train(), host, config


def adapter_settings(tiny_chroma, shapes_dir, tmp_path, kind, **extra):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(lora_type=kind, network_rank=4, lora_alpha=12, max_train_steps=6, learning_rate=2e-2)
    return {**settings, **extra}


def test_dora_reloads_in_diffusers_and_reproduces_the_trained_output(tiny_chroma, shapes_dir, tmp_path):
    from diffusers import ChromaPipeline

    trainer, result, host, config = trained(adapter_settings(tiny_chroma, shapes_dir, tmp_path, "dora"))
    tensors = load_file(result.lora_files[0])
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(magnitudes) == len(trainer.targets)
    prepared = trainer.prepare_data()
    entry = prepared.text.load(prepared.entries[0].text)
    ours = predict(host, config, trainer.model.eval(), entry)
    pipe = ChromaPipeline.from_pretrained(tiny_chroma, torch_dtype=torch.float32)
    base = predict(host, config, pipe.transformer, entry)
    pipe.load_lora_weights(str(result.lora_files[0]))
    assert not torch.allclose(base, ours, atol=1e-4)
    torch.testing.assert_close(predict(host, config, pipe.transformer, entry), ours, atol=1e-5, rtol=1e-4)
    # without its magnitudes the file is a plain LoRA and gives another output: they carry the DoRA
    plain = ChromaPipeline.from_pretrained(tiny_chroma, torch_dtype=torch.float32)
    plain.load_lora_weights({k: v for k, v in tensors.items() if k not in magnitudes})
    assert not torch.allclose(predict(host, config, plain.transformer, entry), ours, atol=1e-4)


def test_dora_in_comfyuis_fused_layout_reproduces_the_trained_output(tiny_chroma, shapes_dir, tmp_path):
    """The BFL-named file carries a dora_scale per fused row; read with ComfyUI's row-wise
    weight_decompose (base row norms) and added to the base, it gives the trained outputs, also for
    a fused weight whose other rows (a single block's proj_mlp, outside the "all" preset) have no adapter."""
    from tuner.plugins.fluxlike.bfl import read_comfyui

    trainer, result, host, config = trained(
        adapter_settings(tiny_chroma, shapes_dir, tmp_path, "dora", lora_format="all")
    )
    comfy = load_file(tmp_path / "out" / "pytorch_lora_weights_comfyui.safetensors")
    scales = {k: v for k, v in comfy.items() if k.endswith(".dora_scale")}
    assert scales and all(v.shape[1] == 1 for v in scales.values())
    prepared = trainer.prepare_data()
    entry = prepared.text.load(prepared.entries[0].text)
    ours = predict(host, config, trainer.model.eval(), entry)
    fresh = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    deltas, unmatched = read_comfyui(comfy, fresh)
    assert not unmatched
    with torch.no_grad():
        for name, delta in deltas.items():
            fresh.get_submodule(name).weight += delta
    torch.testing.assert_close(predict(host, config, fresh, entry), ours, atol=1e-5, rtol=1e-4)
    # without dora_scale ComfyUI would apply the plain LoRA part: another output
    plain, _ = read_comfyui({k: v for k, v in comfy.items() if k not in scales}, trainer.model)
    assert any(not torch.allclose(plain[m], deltas[m], atol=1e-5) for m in deltas)


@pytest.mark.parametrize(
    ("kind", "extra", "keys"),
    [
        ("lokr", {}, {"lokr_w1", "lokr_w2", "alpha"}),  # both sides whole at rank 4: the scale folded into w1
        ("lokr", {"network_rank": 1, "lora_alpha": 3}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
        ("lokr", {"lokr_factor": 4}, {"lokr_w1", "lokr_w2", "alpha"}),
        ("loha", {}, {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
    ],
    ids=["lokr-whole", "lokr-factored", "lokr-factor-4", "loha"],
)
def test_lycoris_files_read_with_comfyuis_arithmetic_reproduce_the_trained_output(
    tiny_chroma, shapes_dir, tmp_path, kind, extra, keys
):
    """The file's weight changes, read as ComfyUI reads them and added to the base weights, give
    the outputs of the trained model (peft's forward): the file is what was trained."""
    trainer, result, host, config = trained(adapter_settings(tiny_chroma, shapes_dir, tmp_path, kind, **extra))
    tensors = load_file(result.lora_files[0])
    assert {k.rsplit(".", 1)[1] for k in tensors} == keys and all(k.startswith("transformer.") for k in tensors)
    prepared = trainer.prepare_data()
    entry = prepared.text.load(prepared.entries[0].text)
    ours = predict(host, config, trainer.model.eval(), entry)
    deltas, unmatched = read_lycoris(tensors, trainer.model)
    assert not unmatched and sorted(deltas) == sorted(trainer.targets)
    fresh = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    base = predict(host, config, fresh, entry)
    with torch.no_grad():
        for name, delta in deltas.items():
            fresh.get_submodule(name).weight += delta
    assert not torch.allclose(base, ours, atol=1e-4)
    torch.testing.assert_close(predict(host, config, fresh, entry), ours, atol=1e-5, rtol=1e-4)
    if kind == "lokr" and "lokr_w2" in keys:  # whole sides: alpha written as the rank (scale 1 everywhere)
        assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}


def test_a_self_test_catches_a_lycoris_file_that_does_not_match(tiny_chroma, shapes_dir, tmp_path):
    trainer, result, host, _ = trained(adapter_settings(tiny_chroma, shapes_dir, tmp_path, "loha", max_train_steps=2))
    tensors = load_file(result.lora_files[0])
    key = next(k for k in tensors if k.endswith(".hada_w2_b"))
    broken = copy.deepcopy(tensors)
    broken[key] = broken[key] * 1.5
    deltas, _ = read_lycoris(broken, trainer.model)
    module = key.removeprefix("transformer.").rsplit(".", 1)[0]
    assert not torch.allclose(deltas[module], trained_deltas(trainer.model)[module], atol=1e-6)


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_a_resume_is_exact_for_each_type(tiny_chroma, shapes_dir, tmp_path, kind):
    straight = adapter_settings(
        tiny_chroma, shapes_dir, tmp_path / "a", kind, checkpointing_steps=3, train_batch_size=2
    )
    assert_resume_is_exact(straight, 2, checkpointing_steps=5)


@pytest.mark.parametrize(
    ("kind", "precision"),
    [("dora", "int8-quanto"), ("lokr", "int8-quanto"), ("loha", "int8-quanto"), ("dora", "nf4-bnb")],
)
def test_each_type_trains_on_a_quantized_base(tiny_chroma, shapes_dir, tmp_path, kind, precision):
    """Adapters on top of the quantized weights, never merged; the self-test (with DoRA's
    magnitudes against the dequantized base) passes."""
    settings = adapter_settings(
        tiny_chroma, shapes_dir, tmp_path, kind, base_model_precision=precision, max_train_steps=2
    )
    trainer, result, _, _ = trained(settings)
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    base = trainer.model.transformer_blocks[0].attn.to_q.get_base_layer()
    assert type(base).__name__ == {"int8-quanto": "QLinear", "nf4-bnb": "Linear4bit"}[precision]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"lora_type": "lycoris"}, "lora_type: 'lycoris' is not one of lora, dora, lokr, loha"),
        ({"lora_type": "lokr", "lokr_factor": 0}, "lokr_factor: 0 is not a factor"),
        ({"lora_type": "lokr", "lora_format": "comfyui"}, "lora_format: comfyui cannot store lora_type lokr"),
    ],
)
def test_bad_adapter_settings_are_one_line_errors(tiny_chroma, shapes_dir, tmp_path, extra, message):
    with pytest.raises(ConfigError) as info:
        make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), **extra})
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_on_packed_nf4_weights_are_refused_by_name(tiny_chroma, shapes_dir, tmp_path, kind):
    settings = adapter_settings(tiny_chroma, shapes_dir, tmp_path, kind, base_model_precision="nf4-bnb")
    with pytest.raises(ConfigError) as info:
        trained(settings)
    message = str(info.value)
    assert f"lora_type: peft's {kind} cannot wrap the packed weights of base_model_precision nf4-bnb" in message
    assert "use int8-quanto or int4-quanto, or lora or dora" in message and "\n" not in message


def test_a_lokr_factor_that_does_not_divide_a_width_names_the_layer(tiny_chroma, shapes_dir, tmp_path):
    with pytest.raises(ConfigError) as info:
        trained(adapter_settings(tiny_chroma, shapes_dir, tmp_path, "lokr", lokr_factor=7))
    message = str(info.value)
    assert "lokr_factor: 7 does not divide the input width 32 of " in message and "or -1" in message
    assert "\n" not in message


def test_all_formats_leave_out_the_fused_comfyui_file_for_lokr(tiny_chroma, shapes_dir, tmp_path):
    warnings: list[str] = []
    settings = adapter_settings(tiny_chroma, shapes_dir, tmp_path, "loha", lora_format="all")
    config = make_config(make_host(), settings, warnings)
    assert config.lora_format == ["diffusers"]
    assert warnings == ["test.yaml: lora_format all: comfyui cannot store lora_type loha; writing diffusers"]
    config = make_config(make_host(), adapter_settings(tiny_chroma, shapes_dir, tmp_path, "lora", lora_format="all"))
    assert config.lora_format == ["diffusers", "comfyui"]


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_check_lora_reads_each_type(tiny_chroma, shapes_dir, tmp_path, kind):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    _, result, _, _ = trained(adapter_settings(tiny_chroma, shapes_dir, tmp_path, kind, max_train_steps=2))
    command = ["check-lora", str(result.lora_files[0]), "--plugin", "chroma", "--model", str(tiny_chroma)]
    out = CliRunner().invoke(app, command)
    assert out.exit_code == 0 and "OK: every key loads" in out.output, out.output
    assert f"lora_type {kind}, diffusers layout" in out.output
    # as ComfyUI loads the same file: LyCORIS keys under diffusers names load; a DoRA's magnitudes do not
    comfy = CliRunner().invoke(app, [*command, "--format", "comfyui"])
    if kind == "dora":
        assert comfy.exit_code == 1 and "lora_magnitude_vector" in comfy.output, comfy.output
    else:
        assert comfy.exit_code == 0 and "OK: every key loads" in comfy.output, comfy.output
    tensors = load_file(result.lora_files[0])
    if kind == "dora":  # without its magnitudes (metadata kept) the file is not the DoRA it says it is
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(result.lora_files[0]), framework="pt") as handle:
            metadata = handle.metadata()
        stripped = tmp_path / "stripped.safetensors"
        save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, stripped, metadata=metadata)
        out = CliRunner().invoke(app, [command[0], str(stripped), *command[2:]])
        assert out.exit_code == 1 and "tensors a dora file holds are missing" in out.output, out.output
    key = next(k for k in tensors if "transformer_blocks.0.attn.to_k." in k and not k.endswith(".alpha"))
    tensors[key.replace("to_k", "to_kk")] = tensors.pop(key)
    renamed = tmp_path / "renamed.safetensors"
    from safetensors.torch import save_file

    save_file(tensors, renamed)
    out = CliRunner().invoke(app, [command[0], str(renamed), *command[2:]])
    assert out.exit_code == 1 and "to_kk" in out.output, out.output


def test_torch_dequantize_on_a_float_parameter_breaks_it_and_tuner_never_calls_it():
    """The bug behind tuner.core.fixes.dequantized: torch's Tensor.dequantize on a float Parameter
    leaves a grad_fn behind, and the module then refuses the weight."""
    from tuner.core.fixes import dequantized
    from tuner.core.model.adapters import base_weight

    layer = torch.nn.Linear(4, 4)
    layer.weight.dequantize()
    with pytest.raises(ValueError, match="Cannot assign non-leaf Tensor"):
        with torch.no_grad():
            layer.weight += 1
    clean = torch.nn.Linear(4, 4)
    assert dequantized(clean.weight) is clean.weight
    assert torch.equal(base_weight(clean), clean.weight)
    with torch.no_grad():
        clean.weight += 1  # still assignable


class RsLoraPlugin:
    """A third party's adapter type, registered from a plugin alone: rank-stabilised LoRA (peft's
    ``use_rslora``), whose scale is alpha / sqrt(rank), not alpha / rank."""

    @staticmethod
    def _peft_config(config, target_modules):
        from peft import LoraConfig

        return LoraConfig(
            r=config.network_rank, lora_alpha=config.lora_alpha, target_modules=target_modules, use_rslora=True
        )

    @hookimpl
    def register_adapter_types(self, register):
        register(AdapterInfo("rslora", "rank-stabilised LoRA", peft_config=self._peft_config, low_rank=True))


def test_an_adapter_type_registered_by_a_plugin_trains_and_reloads_in_every_format(tiny_chroma, shapes_dir, tmp_path):
    """Nothing in the core names it: the config accepts it, the run trains it, and both files
    (diffusers and ComfyUI's fused layout) reload as trained because the file's alpha comes from
    peft's scaling (alpha * sqrt(rank) here), which the self-test of every final file checks."""
    plugin = ("rslora-plugin", RsLoraPlugin())
    host = make_host(plugin)
    assert host.adapter_types["rslora"].plugin == "rslora-plugin"
    assert "rslora" in host.choices(host.config_keys()["lora_type"])[1]
    settings = adapter_settings(tiny_chroma, shapes_dir, tmp_path, "rslora", lora_format="all")
    result, _, config = train(settings, plugin)
    assert result.lora_files and set(config.lora_format) == {"diffusers", "comfyui"}
    alphas = {float(v) for k, v in load_file(result.lora_files[0]).items() if k.endswith(".alpha")}
    assert alphas == {12 * 4**0.5}  # alpha / sqrt(rank) == file alpha / rank
    with pytest.raises(ConfigError, match=r"lora_type: 'rslora' is not one of lora, dora, lokr, loha"):
        make_config(make_host(), settings)  # without the plugin, the name is unknown
