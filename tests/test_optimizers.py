"""The optimizer registry: the bundled optimizers pass the optimizer contract (as a third-party one
does, examples/tuner-lion), and bad settings are one-line errors naming the key."""

from __future__ import annotations

import pytest

from tuner.core.errors import ConfigError
from tuner.core.host.records import OptimizerInfo
from tuner.testing.optimizer_contract import OptimizerContract

from .conftest import base_settings, make_config, make_host, train

BUNDLED = "tuner.plugins.optimizers.plugin"


class SharedModel:
    """One tiny model and the session's shapes for every class, instead of building them per class."""

    @pytest.fixture(scope="class")
    def tiny_model(self, kit_model):
        return kit_model

    @pytest.fixture(scope="class")
    def dataset(self, shapes_dir):
        return shapes_dir


class TestAdamW(SharedModel, OptimizerContract):
    optimizer, plugin_module, class_name = "adamw", "tuner.core.builtin.defaults", "AdamW"

    def host(self):  # the core registers adamw itself
        from tuner.testing import family
        from tuner.testing import make_host as plugins_alone

        return plugins_alone((family.NAME, family), family=family.NAME)

    def test_registers_the_optimizer(self):
        assert self.host().optimizers["adamw"].plugin == "core"

    def test_hook_module_does_not_import_heavy_libraries(self):
        pass  # the core's builtin module is checked by the CLI's start-up test


class TestAdamW8bit(SharedModel, OptimizerContract):
    optimizer, plugin_module, class_name = "adamw8bit", BUNDLED, "AdamW8bit"


class TestAdafactor(SharedModel, OptimizerContract):
    optimizer, plugin_module, class_name = "adafactor", BUNDLED, "Adafactor"


class TestProdigy(SharedModel, OptimizerContract):
    optimizer, plugin_module, class_name = "prodigy", BUNDLED, "Prodigy"
    learning_rate = 1.0
    optimizer_config = "d_coef=4"


def test_bad_optimizer_settings_are_one_line_errors(tiny_chroma, shapes_dir, tmp_path):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    host = make_host()

    def refused(**extra) -> str:
        with pytest.raises(ConfigError) as info:
            make_config(host, {**settings, **extra})
        assert "\n" not in str(info.value)
        return str(info.value)

    message = refused(optimizer="adamw_8bit")
    assert "optimizer: unknown optimizer 'adamw_8bit' (did you mean 'adamw8bit'?)" in message
    assert "registered: adafactor, adamw, adamw8bit" in message and "prodigy" in message
    assert "optimizer_config: 'd_coef' is not name=value" in refused(optimizer="prodigy", optimizer_config="d_coef")
    # a name the optimizer does not take: refused when it is built, by name, before any step
    with pytest.raises(ConfigError) as info:
        train({**settings, "optimizer": "adafactor", "optimizer_config": "betas=0.9"})
    assert "optimizer_config: adafactor: " in str(info.value) and "betas" in str(info.value)

    class Missing:
        from tuner.core import hookimpl

        @hookimpl
        def register_optimizers(self, register):
            register(
                OptimizerInfo("shampoo", "needs a package", lambda *a: None, ("no_such_module_x",), "pip install x")
            )

    host = make_host(("shampoo", Missing()))
    with pytest.raises(ConfigError) as info:
        make_config(host, {**settings, "optimizer": "shampoo"})
    assert str(info.value).endswith("optimizer: shampoo needs no_such_module_x, which is not installed; pip install x")


def test_prodigy_with_an_adamw_learning_rate_is_warned_about(tiny_chroma, shapes_dir, tmp_path):
    warnings: list[str] = []
    make_config(make_host(), {**base_settings(tiny_chroma, shapes_dir, tmp_path), "optimizer": "prodigy"}, warnings)
    assert any("learning_rate 0.001 with prodigy" in w and "1.0 is the usual value" in w for w in warnings)


def test_an_optimizer_registered_twice_names_both_plugins():
    from tuner.core import hookimpl
    from tuner.core.errors import PluginError

    class Again:
        @hookimpl
        def register_optimizers(self, register):
            register(OptimizerInfo("adamw", "another adamw", lambda *a: None))

    with pytest.raises(PluginError) as info:
        make_host(("again", Again()))
    assert "optimizer 'adamw' is registered twice" in str(info.value) and "'again'" in str(info.value)


def test_the_estimate_counts_each_optimizers_state(tiny_chroma, shapes_dir, tmp_path):
    """adamw8bit and prodigy cannot step on fake tensors: their state is measured on real tensors
    of each parameter shape. 8-bit states are a quarter of AdamW's two fp32 moments; Prodigy keeps
    four tensors per parameter."""
    import torch

    from tuner.core.estimate.trace import real_state_bytes

    host = make_host()
    params = [torch.nn.Parameter(torch.zeros(16, 3072)) for _ in range(3)]
    measured = {}
    for name in ("adamw", "adamw8bit", "prodigy"):
        config = make_config(host, {**base_settings(tiny_chroma, shapes_dir, tmp_path), "optimizer": name}, [])
        measured[name] = real_state_bytes(host, config, params)
    moments = 3 * 16 * 3072 * 4 * 2  # two fp32 moments per parameter
    assert moments <= measured["adamw"] <= moments + 64
    assert moments / 4 <= measured["adamw8bit"] <= moments / 4 * 1.1
    assert 2 * moments <= measured["prodigy"] <= 2 * moments + 64
