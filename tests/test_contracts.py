"""The plugin contracts of Foundation II, exercised the way a third-party package meets them:
who answers a hook, keys a family ignores or refuses, checks in the config, the family's
implementation module, typed events, and one error for one bad target list in training and the
estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tuner.core import hookimpl
from tuner.core.errors import ConfigError, PluginError
from tuner.core.host.events import RunEnd, RunStart, StepEnd
from tuner.core.host.records import FamilyInfo

from .conftest import base_settings, make_config, make_host, train


def draw_sigmas(host, config) -> torch.Tensor:
    return host.provide(
        "sample_sigmas",
        config=config,
        batch_size=256,
        latent_shape=(256, 16, 8, 8),
        generator=torch.Generator().manual_seed(0),
    )


class PlainSigmas:
    """An extension that answers sample_sigmas without asking to go first."""

    @hookimpl
    def sample_sigmas(self, batch_size):
        return torch.full((batch_size,), 0.5)


class FirstSigmas:
    """An extension that overrides the family explicitly."""

    @hookimpl(tryfirst=True)
    def sample_sigmas(self, batch_size):
        return torch.full((batch_size,), 0.25)


def test_the_family_answers_its_own_hooks_whatever_the_extensions_are_called():
    reference_host = make_host()
    config = make_config(reference_host, {})
    reference = draw_sigmas(reference_host, config)  # chroma's remapped logit-normal
    assert reference.std() > 0.1
    # one extension whose name sorts before the family's, one after
    host = make_host(("aaa-ext", PlainSigmas()), ("zzz-ext", PlainSigmas()))
    assert torch.equal(draw_sigmas(host, config), reference)


@pytest.mark.parametrize("name", ["aaa-ext", "zzz-ext"])
def test_an_extension_overrides_the_family_only_with_tryfirst(name):
    host = make_host((name, FirstSigmas()), ("other", PlainSigmas()))
    assert bool((draw_sigmas(host, make_config(host, {})) == 0.25).all())


def _installed_extension(root, name: str, first: bool) -> None:
    """A distribution (dist-info + module) on ``root`` registering ``name`` in the tuner group."""
    marker = "@hookimpl(tryfirst=True)" if first else "@hookimpl"
    (root / f"{name}.py").write_text(
        "from tuner.core import hookimpl\n\n\n"
        f"{marker}\n"
        "def sample_sigmas(batch_size):\n"
        "    import torch\n\n"
        f"    return torch.full((batch_size,), {0.25 if first else 0.5})\n"
    )
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[tuner]\n{name.replace('_', '-')} = {name}\n")


def _sigma_histogram(env) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "sigmas", "--plugin", "chroma", "--samples", "500", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)["counts"]


def test_installed_extensions_on_either_side_of_the_family_name(tmp_path):
    """The same rule through real entry points: `aaa_ext` sorts before `chroma`, `zzz_ext` after."""
    plain = tmp_path / "plain"
    plain.mkdir()
    _installed_extension(plain, "aaa_ext", first=False)
    _installed_extension(plain, "zzz_ext", first=False)
    counts = _sigma_histogram({**os.environ, "PYTHONPATH": str(plain)})
    assert sum(1 for c in counts if c) > 5  # chroma's own density, not a constant
    first = tmp_path / "first"
    first.mkdir()
    _installed_extension(first, "aaa_ext", first=False)
    _installed_extension(first, "zzz_ext", first=True)
    counts = _sigma_histogram({**os.environ, "PYTHONPATH": str(first)})
    assert sum(1 for c in counts if c) == 1  # every sigma is the override's 0.25


class NoTargets:
    @hookimpl(wrapper=True)
    def lora_target_modules(self):
        yield
        return ["no_such_module"]


def test_estimate_and_training_refuse_a_target_list_that_matches_nothing_alike(tiny_chroma, shapes_dir, tmp_path):
    from tuner.core.estimate import estimate
    from tuner.core.run.trainer import Trainer

    host = make_host(("no-targets", NoTargets()))
    config = make_config(host, base_settings(tiny_chroma, shapes_dir, tmp_path))
    with pytest.raises(ConfigError) as from_training:
        Trainer(host, config, warn=lambda m: None).setup()
    with pytest.raises(ConfigError) as from_estimate:
        estimate(host, config, "cpu")
    expected = "test.yaml: LoRA targets ['no_such_module'] match no Linear module of the model"
    assert str(from_training.value) == str(from_estimate.value) == expected


def test_config_checks_run_where_the_config_is_built(monkeypatch):
    """fp16 without CUDA is refused by build_config, so estimate and configure refuse it too."""
    import tuner.core.training.runtime

    monkeypatch.setattr(tuner.core.training.runtime, "device_type", lambda: "cpu")
    with pytest.raises(ConfigError, match=r"mixed_precision: fp16 needs a CUDA GPU; use bf16 or no"):
        make_config(make_host(), {"mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match=r"lora_format: 'safetensors': choose from diffusers, comfyui, or all"):
        make_config(make_host(), {"lora_format": "safetensors"})
    with pytest.raises(ConfigError, match=r"text_encoder_1_precision: unknown precision 'int3'"):
        make_config(make_host(), {"text_encoder_1_precision": "int3"})
    with pytest.raises(ConfigError, match=r"text_encoder_2_precision: chroma does not support text_encoder_2"):
        make_config(make_host(), {"text_encoder_2_precision": "int8-quanto"})


def test_tuner_keys_says_which_keys_chroma_ignores_or_refuses():
    from typer.testing import CliRunner

    from tuner.core.cli import app

    out = CliRunner().invoke(app, ["keys", "--plugin", "chroma"]).output
    lines = out.splitlines()

    def notes(key: str) -> str:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:") or line.startswith(f"{key} "))
        return "\n".join(lines[start : start + 3])

    for key in ("flux_guidance_mode", "flux_guidance_value", "flow_schedule_shift", "flow_schedule_auto_shift"):
        assert "IGNORED by chroma" in notes(key), notes(key)
    for key in ("flux_fast_schedule", "text_encoder_2_precision"):
        assert "REFUSED by chroma when set" in notes(key), notes(key)
    assert "REFUSED" not in notes("validation_init_image")  # img2img validation: ChromaImg2ImgPipeline
    assert "IGNORED" not in notes("chroma_sigma_remap") and "REFUSED" not in notes("network_rank")


class Recorder:
    """A tracker plugin as a third party writes it: typed events, dispatched with isinstance."""

    def __init__(self):
        self.steps: list[tuple[int, float, float]] = []
        self.kinds: list[str] = []

    @hookimpl
    def training_event(self, event):
        self.kinds.append(type(event).__name__)
        if isinstance(event, StepEnd):
            self.steps.append((event.step, event.loss, event.lr))
        elif isinstance(event, RunStart):
            assert event.model is not None and event.lora_modules > 0 and event.resumed_step is None
        elif isinstance(event, RunEnd):
            assert event.lora_files and event.lora_files[0].endswith(".safetensors")


def test_trackers_receive_typed_events(tiny_chroma, shapes_dir, tmp_path):
    recorder = Recorder()
    result, _, _ = train(base_settings(tiny_chroma, shapes_dir, tmp_path), ("recorder", recorder))
    assert [s for s, _, _ in recorder.steps] == [1, 2, 3, 4]
    assert [loss for _, loss, _ in recorder.steps] == result.losses
    assert recorder.kinds[0] == "RunStart" and recorder.kinds[-1] == "RunEnd" and "Save" in recorder.kinds
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == result.losses  # the JSONL log is written from the same events
    assert set(rows[0]) == {"step", "loss", "lr", "sigma", "sigmas", "grad_norm", "sizes", "datasets", "elapsed_s"}
    assert rows[0]["sizes"] == [[64, 64]]  # each micro-batch's pixel height and width


def test_building_a_config_never_imports_the_family_implementation():
    code = (
        "import sys\n"
        "from tuner.core.host.manager import PluginHost\n"
        "from tuner.core.config.build import build_config\n"
        "host = PluginHost('chroma')\n"
        "build_config(host, {'network_rank': 8, 'lora_format': 'all'}, 'x', warn=print)\n"
        "print([m for m in ('torch', 'tuner.plugins.chroma.model') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_an_implementation_may_not_implement_manifest_hooks(tmp_path, monkeypatch):
    (tmp_path / "badimpl.py").write_text(
        "from tuner.core import hookimpl\n\n\n@hookimpl\ndef check_config(config):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    class Manifest:
        @hookimpl
        def register_families(self, register):
            register(FamilyInfo("bad", "bad", {"base": "x/y"}, "base", implementation="badimpl"))

    host = make_host(("bad", Manifest()), family="bad")
    with pytest.raises(PluginError, match=r"badimpl implements check_config, which run before it is loaded"):
        host.hook  # noqa: B018


def test_a_broken_implementation_is_one_line_naming_the_family(tmp_path, monkeypatch):
    (tmp_path / "brokenimpl.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class Manifest:
        @hookimpl
        def register_families(self, register):
            register(FamilyInfo("broken", "broken", {"base": "x/y"}, "base", implementation="brokenimpl"))

    host = make_host(("broken", Manifest()), family="broken")
    make_config(host, {})  # the config is built from the manifest alone
    for _ in range(2):  # every later call fails the same way; none runs without the implementation
        with pytest.raises(PluginError, match=r"the implementation brokenimpl of family broken failed to import: "):
            host.provide("sample_sigmas", config=None, batch_size=1, latent_shape=(1,), generator=None)
