"""Contract tests every optimizer plugin must pass, as a pytest mixin.

    from tuner.testing.optimizer_contract import OptimizerContract

    class TestMyOptimizer(OptimizerContract):
        optimizer = "myopt"
        plugin_module = "myopt_tuner.plugin"
        learning_rate = 1e-3  # a rate at which it overfits one image in 100 steps

The plugin is registered alone beside tuner's core and tuner.testing's own miniature family
(:mod:`tuner.testing.family`, so no bundled family is needed), and trains it on the CPU: the optimizer is found by name, its hook module stays
import-cheap, it lowers the loss, and its state goes into checkpoints as tensors and JSON so that
a resumed run ends bit for bit where an uninterrupted one does.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tuner.core import hookimpl
from tuner.core.api import Interrupted, StepEnd
from tuner.testing.contract import HEAVY


class _StopAt:
    """Plays the user's Ctrl-C after a given step."""

    def __init__(self, step: int, trainer: Any):
        self.step, self.trainer = step, trainer

    @hookimpl
    def training_event(self, event):
        if isinstance(event, StepEnd) and event.step == self.step:
            self.trainer.request_stop()


class OptimizerContract:
    optimizer: str = ""
    plugin_module: str = ""  # dotted module of the plugin's hooks
    learning_rate: float = 1e-2  # a rate at which it overfits one image in 100 steps
    optimizer_config: str | None = None
    class_name: str = ""  # the optimizer's class name, when it should be checked

    # -- fixtures a subclass may override ----------------------------------------------------

    @pytest.fixture(scope="class")
    def tiny_model(self, tmp_path_factory) -> Path:
        from tuner.testing.family import build_tiny_model

        return build_tiny_model(tmp_path_factory.mktemp("optimizer-contract") / "tiny-model")

    @pytest.fixture(scope="class")
    def dataset(self, tmp_path_factory) -> Path:
        from tuner.testing import shapes_dataset

        return shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", size=64)

    def settings(self, model: Path, data: Path, out: Path) -> dict[str, Any]:
        return {
            "pretrained_model_name_or_path": str(model),
            "data_dir": str(data),
            "output_dir": str(out / "out"),
            "cache_dir": str(out.parent / "cache"),
            "resolution": 64,
            "tokenizer_max_length": 16,
            "network_rank": 4,
            "train_batch_size": 2,
            "max_train_steps": 4,
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "memory_estimate": False,
            "report_to": "none",
            "optimizer": self.optimizer,
            "optimizer_config": self.optimizer_config,
            "learning_rate": self.learning_rate,
            "lr_scheduler": "cosine",
            "lr_warmup_steps": 1,
            "seed": 1,
        }

    # -- helpers -----------------------------------------------------------------------------

    def host(self):
        from tuner.testing import family, make_host

        plugin = importlib.import_module(self.plugin_module)
        return make_host((family.NAME, family), ("optimizer-under-test", plugin), family=family.NAME)

    def trainer(self, settings: dict[str, Any]):
        from tuner.core.api import Trainer, build_config

        host = self.host()
        return Trainer(host, build_config(host, settings, "contract", warn=lambda m: None), warn=lambda m: None)

    # -- the contract ------------------------------------------------------------------------

    def test_registers_the_optimizer(self):
        info = self.host().optimizers[self.optimizer]
        assert info.plugin == "optimizer-under-test" and info.description

    def test_hook_module_does_not_import_heavy_libraries(self):
        code = f"import sys, {self.plugin_module}; print([m for m in {HEAVY!r} if m in sys.modules])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", f"{self.plugin_module} imports {out.stdout.strip()} at module level"

    def test_lowers_the_loss_on_one_image(self, tiny_model, dataset, tmp_path):
        one = tmp_path / "one"
        one.mkdir()
        for suffix in (".png", ".txt"):
            (one / f"00_red_circle{suffix}").write_bytes((dataset / f"00_red_circle{suffix}").read_bytes())
        settings = {
            **self.settings(tiny_model, one, tmp_path),
            "train_batch_size": 1,
            "max_train_steps": 100,
            "lr_scheduler": "constant",
            "network_rank": 8,
            "testing_lora_target": "all+ffs",
        }
        trainer = self.trainer(settings)
        losses = trainer.train().losses
        inner = getattr(trainer.state.optimizer, "optimizer", trainer.state.optimizer)  # accelerate's wrapper
        if self.class_name:
            assert type(inner).__name__ == self.class_name
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        assert last < 0.85 * first, f"{self.optimizer}: loss {first:.4f} -> {last:.4f} over 100 steps on one image"

    def test_resume_is_exact_and_the_state_is_tensors_and_json(self, tiny_model, dataset, tmp_path):
        from safetensors.torch import load_file

        straight = {**self.settings(tiny_model, dataset, tmp_path / "a"), "checkpointing_steps": 2}
        self.trainer(straight).train()
        interrupted = {**self.settings(tiny_model, dataset, tmp_path / "b"), "checkpointing_steps": 3}
        stopped = self.trainer(interrupted)
        stopped.ctx.host.pm.register(_StopAt(2, stopped), name="stop-at-2")  # Ctrl-C after step 2
        with pytest.raises(Interrupted):
            stopped.train()
        self.trainer({**interrupted, "resume_from_checkpoint": "latest"}).train()
        for name in ("adapter.safetensors", "optimizer.safetensors"):
            ours = load_file(tmp_path / "a" / "out" / "checkpoint-4" / name)
            resumed = load_file(tmp_path / "b" / "out" / "checkpoint-4" / name)
            assert ours.keys() == resumed.keys() and ours, name
            for key in ours:
                assert ours[key].equal(resumed[key]), f"{name}: {key} differs after a resume"
        state = json.loads((tmp_path / "b" / "out" / "checkpoint-4" / "state.json").read_text())
        assert state["optimizer"]["param_groups"], "the optimizer's param groups are in state.json"
        straight_log = (tmp_path / "a" / "out" / "train_log.jsonl").read_text().splitlines()
        resumed_log = (tmp_path / "b" / "out" / "train_log.jsonl").read_text().splitlines()
        losses = [[json.loads(line)["loss"] for line in log] for log in (straight_log, resumed_log)]
        assert losses[0] == losses[1]
