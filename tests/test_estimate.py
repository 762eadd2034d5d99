"""`tuner estimate`: live-byte counting, the estimate against measured training steps and loaded
quantized models, the real Chroma 1 configuration against the seed's table, and `tuner run`'s warning."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import REPO, base_settings, make_config, make_host, train

CHROMA1 = REPO / "examples" / "models" / "chroma1-configs"
# the seed's figures for LoRA rank 16 on a GPU, in GB
SEED_TABLE = {"no_change": 28, "int8-quanto": 16, "int4-quanto": 11, "nf4-bnb": 8}


def test_live_bytes_counts_each_storage_once_until_it_is_freed():
    from tuner.core.estimate import LiveBytes

    base = torch.zeros(1000)  # 4000 bytes
    live = LiveBytes()
    assert live.track(base, base[:10], {"again": base}) == 4000  # views and repeats share a storage
    with live:
        view = base[10:]
        assert live.current == 4000
        doubled = view * 2 + 1  # the product is freed as soon as the sum exists
        assert live.current == 4000 + 990 * 4
        del doubled
        assert live.current == 4000
        summed = base.sum()
    assert (live.peak, live.current) == (4000 + 2 * 990 * 4, 4000 + summed.element_size())


def measured_training_step(settings: dict) -> tuple[int, object]:
    """Peak live bytes of a real second training step through the Trainer (real tensors, CPU)."""
    from tuner.core.estimate import LiveBytes
    from tuner.core.run.trainer import Trainer

    host = make_host()
    config = make_config(host, settings)
    trainer = Trainer(host, config, warn=lambda m: None)
    prepared = trainer.prepare_data()
    state = trainer.setup()
    from tuner.core.data.cache import CachedDataset

    batches = trainer.batches(CachedDataset(prepared), state.position)
    trainer.optimizer_step(state, batches)  # the optimizer has state from here on
    precision = host.precisions.get(config.base_model_precision)
    with LiveBytes(precision.stored_tensors if precision else None) as live:
        live.track(state.model, state.optimizer.state, state.ema.average if state.ema else {})
        trainer.optimizer_step(state, batches)
    return live.peak, (host, config)


@pytest.fixture(scope="module")
def small_chroma(tmp_path_factory):
    """The tiny Chroma with a wider denoiser (width 256, one block of each kind, 2M parameters):
    big enough that activations dominate the few KiB a tiny model's bookkeeping takes."""
    from diffusers import ChromaTransformer2DModel

    from tuner.plugins.chroma.tiny import build_tiny_chroma

    folder = build_tiny_chroma(tmp_path_factory.mktemp("models") / "small-chroma", seed=0)
    config = dict(ChromaTransformer2DModel.load_config(folder / "transformer"))
    config.update(num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=4)
    config.update(axes_dims_rope=(8, 28, 28), approximator_hidden_dim=64)
    torch.manual_seed(0)
    ChromaTransformer2DModel.from_config(config).save_pretrained(folder / "transformer")
    return folder


@pytest.mark.parametrize("precision", ["no_change", "int8-quanto", "nf4-bnb"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_matches_a_measured_training_step(small_chroma, shapes_dir, tmp_path, checkpointing, precision):
    from tuner.core.estimate import estimate

    settings = {
        **base_settings(small_chroma, shapes_dir, tmp_path),
        "train_batch_size": 2,
        "resolution": 128,
        "gradient_checkpointing": checkpointing,
        "base_model_precision": precision,
    }
    measured, (host, config) = measured_training_step(settings)
    found = estimate(host, config, "cpu")
    train = found.phase("train")
    # a quantized base adds one dequantized layer, which real kernels need not hold at the peak
    assert 0.95 * measured <= train.device <= 1.05 * measured + train.parts.get("dequantized layer", 0)
    assert sum(train.parts.values()) == train.device


@pytest.mark.parametrize(
    ("lora_type", "optimizer"),
    [("dora", "adamw"), ("lokr", "adamw"), ("loha", "adamw"), ("lora", "adamw8bit"), ("lora", "adafactor"),
     ("lora", "prodigy")],
)  # fmt: skip
def test_estimate_matches_each_adapter_type_and_optimizer(small_chroma, shapes_dir, tmp_path, lora_type, optimizer):
    """DoRA's norms, LoKr's and LoHa's full-size products, and optimizers that cannot step on
    fake tensors (their state measured on real ones) are counted as a real step holds them."""
    from tuner.core.estimate import estimate

    settings = {
        **base_settings(small_chroma, shapes_dir, tmp_path),
        "train_batch_size": 2,
        "resolution": 128,
        "gradient_checkpointing": False,
        "lora_type": lora_type,
        "optimizer": optimizer,
        "network_rank": 16,
    }
    measured, (host, config) = measured_training_step(settings)
    train = estimate(host, config, "cpu").phase("train")
    assert 0.95 * measured <= train.device <= 1.05 * measured, (train.device, measured)


@pytest.mark.parametrize(
    "method",
    [
        {"use_ema": True},
        {"scheduled_sampling_max_step_offset": 2, "scheduled_sampling_probability": 1.0},
        # LoHa draws a random number in training mode, which the rollouts switch back on
        {"scheduled_sampling_max_step_offset": 2, "scheduled_sampling_probability": 1.0, "lora_type": "loha"},
        {"caption_dropout_probability": 0.5},
        {"gradient_accumulation_steps": 2},
    ],
    ids=["ema", "rollout", "rollout-loha", "caption-dropout", "accumulation"],
)
def test_estimate_matches_each_training_method(small_chroma, shapes_dir, tmp_path, method):
    """The estimate runs the run's own optimizer step, so what a method adds to a step is counted."""
    from tuner.core.estimate import estimate

    settings = {
        **base_settings(small_chroma, shapes_dir, tmp_path),
        "train_batch_size": 2,
        "resolution": 128,
        "gradient_checkpointing": False,
        **method,
    }
    measured, (host, config) = measured_training_step(settings)
    train = estimate(host, config, "cpu").phase("train")
    assert 0.95 * measured <= train.device <= 1.05 * measured, (train.device, measured)


def test_the_estimate_traces_the_optimizer_step_that_trains(tiny_chroma, shapes_dir, tmp_path, monkeypatch):
    """One function object trains and is traced: a spy on Stepper.optimizer_step sees the Trainer's
    step and the estimate's (fake-tensor) step, and with scheduled sampling on the estimate runs the
    model's own rollout steps too."""
    from tuner.core import hookimpl
    from tuner.core.estimate import estimate
    from tuner.core.estimate.trace import TracingStepper
    from tuner.core.run.trainer import Trainer
    from tuner.core.training.stepper import Stepper

    assert TracingStepper.optimizer_step is Stepper.optimizer_step
    assert TracingStepper.training_loss is Stepper.training_loss
    callers = []
    original = Stepper.optimizer_step

    def spy(self, state, batches):
        callers.append(type(self).__name__)
        return original(self, state, batches)

    monkeypatch.setattr(Stepper, "optimizer_step", spy)
    settings = {
        **base_settings(tiny_chroma, shapes_dir, tmp_path),
        "scheduled_sampling_max_step_offset": 2,
        "scheduled_sampling_probability": 0.5,
    }
    host = make_host()
    config = make_config(host, settings)
    passes = []

    class Count:
        @hookimpl(wrapper=True)
        def predict_flow(self):
            passes.append(torch.is_grad_enabled())
            return (yield)

    estimate(make_host(("count", Count())), config, "cpu")
    assert callers == ["TracingStepper"]
    assert passes.count(False) >= 1 and passes.count(True) >= 1  # rollout steps (no grad) and the trained pass
    trainer = Trainer(host, config, warn=lambda m: None)
    from tuner.core.data.cache import CachedDataset

    prepared = trainer.prepare_data()
    state = trainer.setup()
    assert trainer.optimizer_step(state, trainer.batches(CachedDataset(prepared), state.position)) is not None
    assert callers == ["TracingStepper", "Stepper"]


def test_checkpointing_and_batch_size_move_the_estimate_the_right_way(tiny_chroma, shapes_dir, tmp_path):
    from tuner.core.estimate import estimate

    def train_bytes(**extra):
        host = make_host()
        config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), **extra})
        return estimate(host, config, "cpu").phase("train").parts["batch, gradients, activations"]

    plain = train_bytes(gradient_checkpointing=False)
    assert train_bytes(gradient_checkpointing=True) < 0.8 * plain
    assert train_bytes(gradient_checkpointing=False, train_batch_size=2) > 1.7 * plain
    # 64 -> 128 px: 16 -> 64 image tokens beside 16 text tokens, 2.5x the sequence
    assert train_bytes(gradient_checkpointing=False, resolution=128) > 2.2 * plain


@pytest.mark.parametrize("precision", ["int8-quanto", "int4-quanto", "nf4-bnb"])
def test_quantized_weights_match_the_loaded_model(tiny_chroma, shapes_dir, tmp_path, precision):
    from tuner.core.estimate import estimate
    from tuner.core.model.quantize import load_quantized, quantized_bytes

    host = make_host()
    config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), "base_model_precision": precision})
    loaded = quantized_bytes(load_quantized(host, config, torch.float32), host.precisions[precision])
    found = estimate(host, config, "cpu")
    assert found.phase("train").parts["weights"] == pytest.approx(loaded, rel=0.01)
    assert found.phase("load + quantize").parts["quantized weights"] == found.phase("train").parts["weights"]


@pytest.mark.parametrize("shape", [(256, 3072), (64, 200), (32, 160), (48, 32)])
def test_each_backend_stores_a_layer_in_the_bytes_it_declares(shape):
    """PrecisionInfo.weight_bytes against the backends' real quantized layers (bf16 and fp32
    models; quanto's group size depends on the width, NF4 adds code tables)."""
    from tuner.core.model.quantize import quantized_bytes

    host = make_host()
    for dtype in (torch.bfloat16, torch.float32):
        for name, info in host.precisions.items():
            model = torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0], bias=False)).to(dtype)
            info.quantize(model, "", [])
            declared = info.weight_bytes(*shape, torch.finfo(dtype).bits // 8)
            assert declared == pytest.approx(quantized_bytes(model, info), abs=8), (name, dtype)


@pytest.fixture(scope="module")
def chroma1_estimates():
    """The real Chroma 1 architecture (config files only, no weights) at the seed's settings."""
    from tuner.core.estimate import estimate_precisions

    host = make_host()
    config = make_config(
        host,
        {
            "model_family": "chroma",
            "pretrained_model_name_or_path": str(CHROMA1),
            "network_rank": 16,
            "resolution": 1024,
            "train_batch_size": 1,
            "mixed_precision": "bf16",
            "gradient_checkpointing": True,
            "validation_prompt": "a photo of a cat",
        },
    )
    return {e.precision: e for e in estimate_precisions(host, config, list(SEED_TABLE), "cuda")}


@pytest.mark.slow
def test_real_chroma_training_lands_within_20_percent_of_the_seed_table(chroma1_estimates):
    none = chroma1_estimates["no_change"]
    assert none.settings["transformer_parameters"] == pytest.approx(8.9e9, rel=0.01)
    for precision, gigabytes in SEED_TABLE.items():
        found = chroma1_estimates[precision]
        planned = found.plan(found.phase("train").device) / 1e9
        assert 0.8 * gigabytes <= planned <= 1.2 * gigabytes, (precision, planned, gigabytes)
    trains = [chroma1_estimates[p].phase("train").device for p in SEED_TABLE]
    assert trains == sorted(trains, reverse=True)


def test_real_chroma_phases(chroma1_estimates):
    none, nf4 = chroma1_estimates["no_change"], chroma1_estimates["nf4-bnb"]
    # T5-XXL's encoder (4.76B parameters) in bf16 is on the device while captions are encoded
    assert none.phase("encode text").parts["text encoders"] == pytest.approx(2 * 4.76e9, rel=0.01)
    assert nf4.peak_phase.name == "encode text"  # for a 4-bit base, caching text is the peak
    assert none.peak_phase.name == "train"
    # streaming quantization never holds the bf16 model in RAM
    assert nf4.phase("load + quantize").ram < none.phase("load").ram / 2
    assert none.phase("validate").device < none.phase("train").device


def test_cli_prints_one_row_per_precision_and_json(tiny_chroma, shapes_dir, tmp_path):
    from typer.testing import CliRunner

    from tuner.core.cli import app

    config = tmp_path / "run.json"
    config.write_text(json.dumps(base_settings(tiny_chroma, shapes_dir, tmp_path)))
    runner = CliRunner()
    result = runner.invoke(app, ["estimate", "-c", str(config), "--device", "cpu", "--compare"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines() if line.startswith("  ")]
    assert rows[1:] == ["no_change", "fp8-quanto", "int4-quanto", "int8-quanto", "nf4-bnb"]
    result = runner.invoke(app, ["estimate", "-c", str(config), "--device", "cuda", "--json"])
    found = json.loads(result.output)
    assert found["device_type"] == "cuda"
    assert found["plan_device_bytes"] > found["peak_device_bytes"]
    assert [p["name"] for p in found["phases"]] == ["load", "encode images", "encode text", "train"]
    result = runner.invoke(app, ["estimate", "-c", str(config), "--device", "tpu"])
    assert result.exit_code != 0 and "--device 'tpu': choose cuda, mps or cpu" in str(result.exception)


def test_missing_config_file_is_a_one_line_error(tmp_path, shapes_dir):
    from tuner.core.errors import PluginError
    from tuner.core.estimate import estimate

    host = make_host()
    config = make_config(host, {**base_settings(tmp_path, shapes_dir, tmp_path)})
    with pytest.raises(PluginError, match=r"model_index.json is missing: the estimate needs the model's config files"):
        estimate(host, config, "cpu")


def test_run_prints_the_estimate_and_warns_when_memory_is_short(tiny_chroma, shapes_dir, tmp_path, monkeypatch, capsys):
    import tuner.core.estimate

    monkeypatch.setattr(tuner.core.estimate, "available_ram", lambda: 1024)
    warnings: list[str] = []
    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "memory_estimate": True, "max_train_steps": 1}
    result, _, _ = train(settings, warnings=warnings)
    assert result.steps == 1  # a warning, not a stop
    assert "memory estimate (no_change): at least" in capsys.readouterr().out
    short = [w for w in warnings if w.startswith("the run may need")]
    assert len(short) == 1 and " of RAM (encode images) but 0.0 MiB is free: cache latents once" in short[0]


def test_shortfalls_name_the_phase_and_what_helps(chroma1_estimates):
    from tuner.core.estimate import GiB, shortfalls

    nf4, none = chroma1_estimates["nf4-bnb"], chroma1_estimates["no_change"]
    assert shortfalls(nf4, 64 * GiB, 64 * GiB) == []
    # a 12 GiB card: training with NF4 fits, encoding captions with T5-XXL in bf16 does not
    (line,) = shortfalls(nf4, 12 * GiB, 64 * GiB)
    assert line.startswith("the run may need 12.46 GiB of cuda memory (encode text) but 12.00 GiB is free: ")
    assert "captions not cached yet" in line
    (line,) = shortfalls(none, 24 * GiB, 8 * GiB)  # the card fits; loading the bf16 model needs RAM
    assert line.startswith("the run may need ")  # 16.6 GiB of weights plus this process's own size
    assert " GiB of RAM (load) but 8.00 GiB is free: a quantized base_model_precision streams" in line


def test_a_failing_estimate_does_not_stop_the_run(tiny_chroma, shapes_dir, tmp_path, monkeypatch):
    import tuner.core.estimate

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(tuner.core.estimate, "estimate", broken)
    warnings: list[str] = []
    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "memory_estimate": True, "max_train_steps": 1}
    result, _, _ = train(settings, warnings=warnings)
    assert result.steps == 1
    assert "memory estimate unavailable: RuntimeError: boom" in warnings


def hub_cache_with(root, repo: str, folder) -> None:
    """A Hugging Face cache holding ``folder``'s files as ``repo``'s main revision (no weights)."""
    import shutil

    cached = root / f"models--{repo.replace('/', '--')}"
    snapshot = cached / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (cached / "refs").mkdir()
    (cached / "refs" / "main").write_text("0" * 40)


@pytest.mark.slow
def test_a_hub_id_reads_only_config_files_and_fails_in_one_line_without_them(tmp_path, monkeypatch):
    from tuner.core.errors import PluginError
    from tuner.core.estimate import estimate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    host = make_host()
    config = make_config(host, {"model_family": "chroma", "resolution": 256, "tokenizer_max_length": 64})
    offline = r"^estimate: pretrained_model_name_or_path: lodestones/Chroma1-Base is not in the local hub cache and "
    with pytest.raises(PluginError, match=offline + "HF_HUB_OFFLINE is set"):
        estimate(host, config, "cuda")
    hub_cache_with(tmp_path / "hub", "lodestones/Chroma1-Base", CHROMA1)  # the default flavour's repository
    found = estimate(host, config, "cuda")
    assert found.source == "lodestones/Chroma1-Base"
    assert found.settings["transformer_parameters"] == pytest.approx(8.9e9, rel=0.01)
    # weights not on disk: the mapped files are counted as the parameters in bf16
    assert found.phase("load").parts["weight files"] == 2 * found.settings["transformer_parameters"]
    assert found.settings["transformer_parameters"] == 8_899_983_424  # Chroma 1's denoiser


def test_a_second_start_with_the_same_settings_reuses_the_estimate(tiny_chroma, shapes_dir, tmp_path, monkeypatch):
    """The estimate is remembered under cache_dir, keyed by what shapes memory: the same settings
    (or a new learning rate, or another output_dir) reuse it; a new rank or resolution does not."""
    import tuner.core.estimate
    from tuner.core.estimate.cached import cached_estimate

    real, calls = tuner.core.estimate.estimate, []
    monkeypatch.setattr(tuner.core.estimate, "estimate", lambda *a, **k: calls.append(1) or real(*a, **k))
    host = make_host()
    base = base_settings(tiny_chroma, shapes_dir, tmp_path)

    def start(**changes):
        found, remembered = cached_estimate(host, make_config(host, {**base, **changes}), "cpu", tmp_path / "cache")
        return found.summary(), remembered

    first, remembered = start()
    assert not remembered and len(calls) == 1
    assert start() == (first, True) and len(calls) == 1
    assert start(learning_rate=5e-4, output_dir=str(tmp_path / "elsewhere"), seed=3) == (first, True)
    assert start(network_rank=8)[1] is False and start(resolution=128)[1] is False and len(calls) == 3
    for entry in (tmp_path / "cache" / "estimates").iterdir():
        entry.write_text("{damaged")
    assert start()[1] is False and len(calls) == 4  # a damaged entry is computed again


def test_a_run_prints_the_remembered_estimate(tiny_chroma, shapes_dir, tmp_path, monkeypatch, capsys):
    import tuner.core.estimate

    settings = {**base_settings(tiny_chroma, shapes_dir, tmp_path), "memory_estimate": True, "max_train_steps": 1}
    train(settings)
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory estimate")]
    monkeypatch.setattr(tuner.core.estimate, "estimate", lambda *a, **k: pytest.fail("estimated again"))
    train({**settings, "output_dir": str(tmp_path / "second")})
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory estimate")] == first


@pytest.mark.slow
def test_fsdp_shares_of_real_chroma_per_process(chroma1_estimates):
    """fsdp_enable: each of P processes holds 1/P of the weights and of the optimizer state, plus
    the two largest blocks gathered in the compute dtype; activations stay whole. DDP (no
    fsdp_enable) changes nothing per process."""
    from tuner.core.estimate.sharded import per_process

    whole = chroma1_estimates["no_change"]
    host = make_host()
    ddp = make_config(host, {"model_family": "chroma", "pretrained_model_name_or_path": str(CHROMA1)})
    assert per_process(whole, ddp, 4) is whole
    fsdp = ddp.derive({"fsdp_enable": True, "mixed_precision": "bf16"})
    train = whole.phase("train")
    blocks = sorted(whole.settings["block_bytes"], reverse=True)
    shares = {p: per_process(whole, fsdp, p) for p in (2, 4, 8)}
    for processes, share in shares.items():
        parts = share.phase("train").parts
        assert parts["weights (1/P, as stored)"] == train.parts["weights"] // processes
        assert parts["gathered blocks"] == blocks[0] + blocks[1]  # bf16 as stored: no cast
        assert parts["LoRA + optimizer state (1/P)"] == train.parts["LoRA + optimizer state"] // processes
        assert share.phase("train").device == sum(parts.values())
        assert share.phase("load").ram == whole.phase("load").ram  # every process loads the whole model
        assert "per process of" in share.table().splitlines()[0]
    devices = [shares[p].phase("train").device for p in (2, 4, 8)]
    assert devices == sorted(devices, reverse=True) and devices[0] < train.device
    kept = per_process(whole, fsdp.derive({"fsdp_reshard_after_forward": False}), 4).phase("train")
    assert kept.parts["gathered blocks"] == train.parts["weights"]  # gathered from forward to backward
