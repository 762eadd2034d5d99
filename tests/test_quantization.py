"""Quantized bases under a trained LoRA: int8/int4 (optimum-quanto) and NF4 (bitsandbytes) on CPU."""

from __future__ import annotations

import sys

import pytest
import torch

from tuner.core import hookimpl
from tuner.core.errors import PluginError
from tuner.core.host.events import RunStart
from tuner.core.host.records import PrecisionInfo
from tuner.core.model.quantize import excluded, load_quantized, quantized_bytes, require_backend
from tuner.core.run.trainer import Trainer

from .conftest import base_settings, make_config, make_host, train

PRECISIONS = ["int8-quanto", "int4-quanto", "nf4-bnb", "fp8-quanto"]


def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every non-LoRA tensor of the model as stored (quantized data, scales, float weights)."""
    state = {}
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            state[name] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return state


def plain_linear_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}


@pytest.mark.parametrize("precision", [p for p in PRECISIONS if p != "fp8-quanto"])  # fp8: int8's code path
def test_only_the_declared_modules_stay_unquantized(tiny_chroma, shapes_dir, tmp_path, precision):
    host = make_host()
    config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), "base_model_precision": precision})
    model = load_quantized(host, config, torch.float32)
    declared = host.call("high_precision_modules", transformer=model, config=config)
    assert "distilled_guidance_layer" in declared and "x_embedder" in declared
    all_linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected_plain = {n for n in all_linears if excluded(n, declared)}
    assert plain_linear_names(model) == expected_plain
    assert any(n.startswith("distilled_guidance_layer.") for n in expected_plain)
    assert all(not n.startswith(("transformer_blocks", "single_transformer_blocks")) for n in expected_plain)
    # same weights as the float model, up to quantization error
    reference = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
    torch.testing.assert_close(model.x_embedder.weight, reference.x_embedder.weight, rtol=0, atol=0)


def test_a_sharded_folder_is_read_through_its_index_and_stray_files_are_not_mixed_in(tiny_chroma, shapes_dir, tmp_path):
    """Found on a GPU: a folder with the real model's shards beside a stale single file of a tiny
    model fed the tiny model's tensors into the real one (\"a tensor of shape [32] in bias\")."""
    import shutil

    from diffusers import ChromaTransformer2DModel

    folder = tmp_path / "model"
    shutil.copytree(tiny_chroma, folder)
    reference = ChromaTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    wider = ChromaTransformer2DModel.from_config({**reference.config, "approximator_hidden_dim": 48})
    wider.save_pretrained(folder / "transformer", max_shard_size="20KB")  # shards + index, beside the old file
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert len(list((folder / "transformer").glob("*.safetensors"))) > 2
    host = make_host()
    config = make_config(host, {**base_settings(folder, shapes_dir, tmp_path), "base_model_precision": "int8-quanto"})
    model = load_quantized(host, config, torch.float32)
    for name in ("distilled_guidance_layer.in_proj.weight", "x_embedder.weight"):
        torch.testing.assert_close(model.get_parameter(name), wider.get_parameter(name), rtol=0, atol=0)


def test_blocks_are_quantized_one_at_a_time_as_they_stream_in(tiny_chroma, shapes_dir, tmp_path):
    """At every quantize call, float (unquantized, quantizable) weights exist only in the current unit."""
    seen = []

    class Spy:  # a precision registered by a plugin: int8 with a look at the model before each unit
        @hookimpl
        def register_precisions(self, register):
            def quantize(model, unit, exclude):
                declared = host.call("high_precision_modules", transformer=model, config=config)
                loaded_float = [
                    n
                    for n, m in model.named_modules()
                    if type(m) is torch.nn.Linear and not m.weight.is_meta and not excluded(n, declared)
                ]
                seen.append((unit, all(n.startswith(unit + ".") or n == unit for n in loaded_float)))
                return int8.quantize(model, unit, exclude)

            register(PrecisionInfo("spy-int8", "int8-quanto, watched", ("optimum.quanto",), quantize=quantize))

    int8 = make_host().precisions["int8-quanto"]
    host = make_host(("spy", Spy()))
    config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), "base_model_precision": "spy-int8"})
    load_quantized(host, config, torch.float32)
    units = [u for u, _ in seen]
    assert units[units.index("transformer_blocks.0") :][:3] == [
        "transformer_blocks.0",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    assert {"x_embedder", "proj_out", "distilled_guidance_layer"} <= set(units)
    assert all(ok for _, ok in seen), seen


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_trains_with_falling_loss_and_frozen_base(tiny_chroma, one_image_dir, tmp_path, precision):
    settings = base_settings(tiny_chroma, one_image_dir, tmp_path)
    settings.update(
        base_model_precision=precision,
        max_train_steps=60,
        learning_rate=1e-2,
        network_rank=8,
        flux_lora_target="all+ffs",
        seed=1,
        validation_prompt="a red circle",
        validation_num_inference_steps=2,
        validation_steps=30,
    )
    snapshots = {}

    class Snapshot:  # the trained model reaches observers with the run_start event
        @hookimpl
        def training_event(self, event):
            if isinstance(event, RunStart):
                snapshots["start"] = base_state(event.model)

    host = make_host(("snapshot", Snapshot()))
    config = make_config(host, settings)
    trainer = Trainer(host, config, warn=lambda m: None)
    result = trainer.train()
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    after = base_state(trainer.model)
    assert after.keys() == snapshots["start"].keys()
    for name, value in snapshots["start"].items():  # validation ran twice in between
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[name]), name


@pytest.mark.parametrize("precision", ["int8-quanto", "nf4-bnb"])
def test_lora_from_a_quantized_base_loads_onto_an_unquantized_base(tiny_chroma, shapes_dir, tmp_path, precision):
    from diffusers import ChromaPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(base_model_precision=precision, max_train_steps=4, learning_rate=5e-3, lora_alpha=2)
    result, _, _ = train(settings)
    saved = load_file(result.lora_files[-1])
    pipe = ChromaPipeline.from_pretrained(tiny_chroma, torch_dtype=torch.float32)
    pipe.load_lora_weights(str(result.lora_files[-1]))
    adapter = next(iter(pipe.transformer.peft_config))  # diffusers names it default_0
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=adapter)
    weights = {k: v for k, v in saved.items() if not k.endswith(".alpha")}
    assert {f"transformer.{k}" for k in loaded} == set(weights)
    assert all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in weights.items())


def test_flux_trains_on_an_nf4_base(tiny_flux, shapes_dir, tmp_path):
    settings = base_settings(tiny_flux, shapes_dir, tmp_path, "flux")
    settings.update(base_model_precision="nf4-bnb", max_train_steps=3)
    result, host, config = train(settings)
    assert result.steps == 3
    assert "norm_out" in host.call(
        "high_precision_modules",
        transformer=host.provide("load_model", config=config, component="transformer", dtype=torch.float32),
        config=config,
    )


@pytest.mark.parametrize(("precision", "module"), [("int8-quanto", "optimum.quanto"), ("nf4-bnb", "bitsandbytes")])
def test_a_missing_library_names_what_to_install(monkeypatch, precision, module):
    host = make_host()
    monkeypatch.setitem(sys.modules, module, None)  # import of it now fails
    with pytest.raises(PluginError, match=f"base_model_precision {precision} needs {module} .*pip install") as info:
        require_backend(host.precisions[precision])
    assert "\n" not in str(info.value)


def test_quantized_weights_are_smaller(tiny_chroma, shapes_dir, tmp_path):
    host = make_host()
    sizes = {}
    for precision in PRECISIONS:
        config = make_config(
            host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), "base_model_precision": precision}
        )
        sizes[precision] = quantized_bytes(load_quantized(host, config, torch.float32), host.precisions[precision])
    full = quantized_bytes(host.provide("load_model", config=config, component="transformer", dtype=torch.float32))
    # 32-wide layers make int4's per-group scales costly; benchmarks/quantization.py measures a
    # mid-size model, where int4 and NF4 come to about a quarter of fp32
    assert all(size < 0.45 * full for size in sizes.values()), (full, sizes)
    assert sizes["nf4-bnb"] < sizes["int8-quanto"]
    assert sizes["fp8-quanto"] == sizes["int8-quanto"]  # a byte a weight and a scale a row, as int8


def test_bitsandbytes_cpu_repack_bug():
    """The bug worked around in the NF4 plugin (tuner.core.fixes): a no-grad eval forward on a CPU
    with avx512bf16 repacks the weights in place and fails below 64 input features."""
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no avx512bf16: bitsandbytes never repacks here")

    def layer(features):
        torch.manual_seed(0)
        linear = bnb.nn.Linear4bit(features, 64, compute_dtype=torch.float32, quant_type="nf4")
        weight = torch.randn(64, features)
        linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to("cpu")
        return linear.eval()

    with torch.no_grad(), pytest.raises((RuntimeError, AssertionError)):
        layer(32)(torch.randn(2, 32))  # narrower than the block size: the repack fails
    wide = layer(128)
    before = wide.weight.data.clone()
    with torch.no_grad():
        wide(torch.randn(2, 128))
    assert not torch.equal(wide.weight.data, before)  # ...and where it works, it rewrites the frozen weights

    for features in (32, 128):  # the plugin's setting: no repack, weights untouched, no error
        fixed = layer(features)
        fixed.support_avx512bf16_for_cpu = False
        before = fixed.weight.data.clone()
        with torch.no_grad():
            fixed(torch.randn(2, features))
        assert torch.equal(fixed.weight.data, before)


@pytest.mark.slow
def test_quanto_int8_crash_on_cpu():
    """The library bug (in a subprocess: it kills the process) and the plugin's fix: bf16
    activations against int8 weights whose scales are fp32, as validation meets them."""
    import subprocess
    import sys

    script = """
import sys, torch, optimum.quanto as quanto
from tuner.plugins.quant_int8.quantizer import quantize
model = torch.nn.Sequential(torch.nn.Linear(256, 32))  # fp32 weights: fp32 scales
if sys.argv[1] == "library":
    quanto.quantize(model, weights=quanto.qint8); quanto.freeze(model)
else:
    quantize(model, "", "qint8", [])
with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
    y = model(torch.randn(1, 256, dtype=torch.bfloat16))
print("ok", tuple(y.shape))
"""
    library = subprocess.run([sys.executable, "-c", script, "library"], capture_output=True, text=True)
    # SIGSEGV (-11) or "expected scalar type BFloat16 but found Float", depending on what ran before
    assert library.returncode != 0, "optimum-quanto handles this now: drop avoid_int8pack_on_cpu"
    fixed = subprocess.run([sys.executable, "-c", script, "plugin"], capture_output=True, text=True)
    assert fixed.returncode == 0 and fixed.stdout.strip() == "ok (1, 32)", fixed.stderr[-500:]


def test_the_int8_fix_registers_where_torch_refuses_to_override_by_default(monkeypatch):
    """torch 2.11 (the GPU machine's) refuses to override a kernel registered from Python unless
    ``allow_override=True`` is passed (2.13 allows it by default): every int8 and fp8 run there
    stopped in ``avoid_int8pack_on_cpu``. Under 2.11's default the fix still registers."""
    import optimum.quanto  # noqa: F401  (registers quanto's own kernels from Python)

    from tuner.plugins.quant_int8 import quantizer

    original = torch.library.Library.impl

    def refusing(self, op_name, fn, dispatch_key="", *, with_keyset=False, allow_override=False):
        return original(self, op_name, fn, dispatch_key, with_keyset=with_keyset, allow_override=allow_override)

    monkeypatch.setattr(torch.library.Library, "impl", refusing)
    with pytest.raises(RuntimeError, match="already a kernel registered from python"):
        torch.library.Library("quanto", "IMPL").impl("qbytes_mm", lambda *a: None, "CPU")
    assert isinstance(quantizer.register_portable_cpu_kernel(), torch.library.Library)


@pytest.mark.parametrize("precision", ["int8-quanto", "fp8-quanto", "nf4-bnb"])
def test_quantized_layers_take_and_give_the_autocast_dtype_as_a_plain_linear_does(precision):
    """Quantized layers bypass autocast. bitsandbytes returns the dtype it is given, so fp32 from a
    norm kept the blocks' residual stream in fp32 (NF4 peaked about 2 GiB above bf16 and int8 on an
    H200), and quanto's fp8 kernel on CUDA refuses fp32 (every fp8 run there stopped)."""
    from tuner.plugins.quant_int8.quantizer import quantize as quanto
    from tuner.plugins.quant_nf4.quantizer import quantize as nf4

    plain = torch.nn.Sequential(torch.nn.Linear(128, 128)).to(torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128)).to(torch.bfloat16)
    if precision == "nf4-bnb":
        nf4(model, "", [])
    else:
        quanto(model, "", {"int8-quanto": "qint8", "fp8-quanto": "qfloat8"}[precision], [])
    seen = []
    model[0].register_forward_pre_hook(lambda layer, args: seen.append(args[0].dtype))
    x = torch.randn(2, 128)  # fp32, as a norm hands it over under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == plain(x).dtype == torch.bfloat16
    assert seen == [torch.bfloat16]
    assert model(x.bfloat16()).dtype == torch.bfloat16  # outside autocast: as given
