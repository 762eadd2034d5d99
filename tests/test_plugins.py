"""Plugin discovery and the host, used the way a third-party package would use them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tuner.core import hookimpl
from tuner.core.errors import PluginError
from tuner.core.host.manager import PluginHost
from tuner.core.host.records import FamilyInfo


def test_bundled_plugins_are_found_through_entry_points():
    host = PluginHost()
    by_name = {r.name: r for r in host.records}
    for name in ("chroma", "flux", "quant_int8", "quant_nf4"):
        assert by_name[name].distribution == "tuner"
        assert by_name[name].error is None
    assert {"chroma", "flux"} <= set(host.families)  # plus any installed third-party family (tuner-sd3)
    assert host.families["chroma"].plugin == "chroma"
    assert set(host.precisions) == {"int8-quanto", "int4-quanto", "fp8-quanto", "nf4-bnb"}
    assert host.families["chroma"].flavours == {
        "base": "lodestones/Chroma1-Base",
        "hd": "lodestones/Chroma1-HD",
        "flash": "lodestones/Chroma1-Flash",
    }


def test_a_run_host_holds_only_the_selected_family():
    host = PluginHost("chroma")
    assert host.pm.get_plugin("chroma") is not None
    assert host.pm.get_plugin("flux") is None
    assert host.pm.get_plugin("quant_nf4") is not None  # non-family plugins take part in every run
    assert "chroma_sigma_remap" in host.config_keys()
    assert "chroma_sigma_remap" not in PluginHost("flux").config_keys()


def test_unknown_family_lists_installed_ones():
    with pytest.raises(PluginError, match=r"unknown model family 'sd9'; installed families: chroma, flux"):
        PluginHost("sd9")


def test_two_plugins_registering_one_family_is_an_error_naming_both():
    class Impostor:
        @hookimpl
        def register_families(self, register):
            register(FamilyInfo("chroma", "another chroma", {"base": "x/y"}, "base"))

    with pytest.raises(
        PluginError, match=r"registered twice: by plugin 'chroma' \(distribution tuner .*\) and by plugin 'impostor'"
    ):
        PluginHost(extra_plugins=[("impostor", Impostor())])


def test_two_distributions_with_one_entry_point_name_are_one_line_naming_both():
    from tuner.core.host.manager import tuner_version

    class Another:
        pass

    with pytest.raises(PluginError) as clash:
        PluginHost(extra_plugins=[("flux", Another())])
    assert str(clash.value) == (
        f"two plugins are named 'flux': from distribution tuner {tuner_version()} and from (registered in process) -; "
        "uninstall one, or leave one out with TUNER_DISABLE_PLUGINS=(registered in process)"
    )


def test_a_misspelled_hook_fails_loudly_naming_the_plugin():
    class Typo:
        @hookimpl
        def sample_sigma(self, config):  # not a hook: sample_sigmas
            return None

    with pytest.raises(PluginError, match="plugin 'typo'.*sample_sigma"):
        PluginHost("chroma", extra_plugins=[("typo", Typo())])


def test_a_provide_hook_with_no_answer_is_a_clear_error():
    class Bare:  # a family that implements no provide hook
        @hookimpl
        def register_families(self, register):
            register(FamilyInfo("bare", "no hooks", {"base": "x/y"}, "base"))

    host = PluginHost("bare", extra_plugins=[("bare", Bare())])
    with pytest.raises(PluginError, match="no plugin answered hook 'predict_flow' \\(model family: bare\\)"):
        host.provide(
            "predict_flow", transformer=None, noisy_latents=None, sigmas=None, text={}, config=None, generator=None
        )


def test_importing_the_cli_and_hook_modules_does_not_import_torch():
    code = (
        "import sys, tuner.core.cli, tuner.core.host.hookspecs, tuner.core.config.values\n"
        "from tuner.core.host.manager import PluginHost; PluginHost('chroma')\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'peft', 'accelerate') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tuner_plugins_lists_versions_and_hooks():
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "plugins", "--json"], capture_output=True, text=True, check=True
    )
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert rows["chroma"]["families"] == ["chroma"]
    assert rows["chroma"]["version"] and rows["chroma"]["distribution"] == "tuner"
    # the entry point is the manifest; the hooks that need torch are in the implementation
    assert rows["chroma"]["hooks"] == ["register_config_keys", "register_families", "register_lora_formats"]
    assert rows["chroma"]["implementation"] == "tuner.plugins.chroma.model"
    assert rows["quant_nf4"]["precisions"] == ["nf4-bnb"]
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "plugins", "--json", "--plugin", "chroma"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    assert "flux" not in rows  # a run host: the other families are not part of it
    implementation = rows["chroma:implementation"]
    assert {"load_model", "sample_sigmas", "predict_flow", "generate_images"} <= set(implementation["hooks"])


def test_unknown_plugin_on_the_command_line_is_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data_dir: x\n")
    out = _cli("run", "--plugin", "nope", "--config", str(config), TUNER_LOAD_PLUGINS="tuner")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: unknown model family 'nope'; installed families: chroma, flux, flux2, qwen_image"
    ]


def test_plugin_commands_are_added_to_the_cli(tmp_path):
    """register_commands: a plugin's command appears on the typer app."""
    import typer
    from typer.testing import CliRunner

    class Extra:
        @hookimpl
        def register_commands(self, app):
            @app.command("hello")
            def hello(name: str = "world"):
                typer.echo(f"hello {name}")

    app = typer.Typer()

    @app.callback()
    def root():
        pass

    PluginHost(extra_plugins=[("extra", Extra())]).hook.register_commands(app=app)
    result = CliRunner().invoke(app, ["hello", "--name", "tuner"])
    assert result.output.strip() == "hello tuner"


def _fake_distribution(root, module_source: str):
    """An installed third-party distribution (dist-info + module) in ``root``, found through sys.path."""
    (root / "broken_family.py").write_text(module_source)
    info = root / "broken_family-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-family\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[tuner]\nbroken = broken_family\n")
    return {**__import__("os").environ, "PYTHONPATH": str(root)}


def test_a_broken_third_party_plugin_is_reported_and_others_keep_working(tmp_path):
    env = _fake_distribution(tmp_path, "raise ImportError('needs libfoo')\n")
    out = subprocess.run([sys.executable, "-m", "tuner.core.cli", "plugins"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    assert "broken       broken-family 0.3" in out.stdout
    assert "failed to import: ImportError: needs libfoo" in out.stdout
    assert "chroma       tuner" in out.stdout

    strict = {**env, "TUNER_STRICT_PLUGINS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", "plugins"], capture_output=True, text=True, env=strict
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: plugin 'broken' from distribution broken-family 0.3 failed to import: ImportError: needs libfoo"
    )


def _cli(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "tuner.core.cli", *args],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, **env},
    )


def test_tuner_load_plugins_empty_means_none_and_disabled_ones_show_with_all():
    out = _cli("plugins", "--json", TUNER_LOAD_PLUGINS="")
    assert {row["name"] for row in json.loads(out.stdout)} == {"core", "jsonl-log", "tensorboard-log"}
    listed = {row["name"]: row for row in json.loads(_cli("plugins", "--json", "--all", TUNER_LOAD_PLUGINS="").stdout)}
    assert listed["chroma"]["disabled"] is True and listed["chroma"]["hooks"] == []


def test_tuner_disable_plugins_removes_a_family():
    out = _cli("sigmas", "--plugin", "flux", TUNER_DISABLE_PLUGINS="flux")
    assert out.returncode == 2 and "unknown model family 'flux'; installed families: chroma" in out.stderr
    assert _cli("sigmas", "--plugin", "chroma", "--samples", "10", TUNER_DISABLE_PLUGINS="flux").returncode == 0


def test_tuner_trace_plugins_prints_which_plugin_answered():
    out = _cli("sigmas", "--plugin", "chroma", "--samples", "10", TUNER_TRACE_PLUGINS="1")
    assert "tuner-trace: sample_sigmas answered by chroma:implementation: Tensor(10,)" in out.stderr
    assert "tuner-trace: check_config called on core" in out.stderr


def test_tuner_plugins_says_which_libraries_a_plugin_lacks(monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from tuner.core.cli import app

    real = importlib.util.find_spec
    absent = {"optimum.quanto", "tensorboard"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    out = CliRunner().invoke(app, ["plugins", "--json"])
    rows = {row["name"]: row for row in json.loads(out.output)}
    assert rows["quant_int8"]["missing"] == [
        "optimum.quanto is not installed (install it with: pip install optimum-quanto  (or: pip install 'tuner[quanto]'))"
    ]
    assert rows["tensorboard-log"]["missing"][0].startswith("tensorboard is not installed (pip install tensorboard")
    assert rows["quant_nf4"]["missing"] == [] and rows["chroma"]["missing"] == []
    text = CliRunner().invoke(app, ["plugins"]).output
    assert "    not usable here: optimum.quanto is not installed" in text


def test_a_run_says_tensorboard_is_off_when_it_is_not_installed(tiny_chroma, shapes_dir, tmp_path, monkeypatch):
    import importlib.util

    from .conftest import base_settings, train

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a),
    )
    from tqdm.auto import tqdm

    logged = []
    monkeypatch.setattr(tqdm, "write", lambda message, *a, **kw: logged.append(message))  # the run's log lines
    train(base_settings(tiny_chroma, shapes_dir, tmp_path))
    assert any(line.startswith("note: TensorBoard logging is off: tensorboard is not installed") for line in logged)


def test_a_familys_record_supplies_defaults_loading_errors_and_the_text_cache_key(tmp_path):
    """What the core answers from FamilyInfo: the family's default for a core key (a run, `tuner
    configure` and the web UI's form see it; a value set by the user wins), a load_model that names
    the field a family forgot, the text cache's fingerprint; a default for a key nobody offers is
    the plugin's error, named."""
    from tuner.core.config.build import build_config

    def host_of(**fields):
        class Family:
            @hookimpl
            def register_families(self, register):
                register(FamilyInfo("data", "a family as data", {"base": str(tmp_path)}, "base", **fields))

        return PluginHost("data", extra_plugins=[("data-plugin", Family())], entry_points=False)

    host = host_of(defaults={"flow_schedule_shift": 3.0}, text_cache_keys=("resolution",), text_encoding="v2")
    assert build_config(host, {}, "t.yaml").flow_schedule_shift == 3.0
    assert build_config(host, {"flow_schedule_shift": 1.5}, "t.yaml").flow_schedule_shift == 1.5
    assert host.choices(host.config_keys()["flow_schedule_shift"])[0] == 3.0
    config = build_config(host, {"resolution": 256}, "t.yaml")
    assert {"resolution": 256, "text_encoding": "v2"} in host.call("cache_fingerprint", config=config, kind="text")
    with pytest.raises(PluginError, match=r"model family data \(data-plugin\) declares no vae_class and does not load"):
        host.provide("load_model", config=config, component="vae", dtype=None)
    with pytest.raises(PluginError, match=r"model family data \(data-plugin\) names config key 'no_such_key'"):
        build_config(host_of(defaults={"no_such_key": 1}), {}, "t.yaml")
