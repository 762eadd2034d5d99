"""Contract tests every model-family plugin must pass, as a pytest mixin.

    from tuner.testing.contract import FamilyContract

    class TestMyFamily(FamilyContract):
        family = "mymodel"
        plugin_module = "mymodel_tuner.plugin"

        @pytest.fixture(scope="class")
        def tiny_model(self, tmp_path_factory):
            return build_my_tiny_model(tmp_path_factory.mktemp("model"))

Override :meth:`settings` for family-specific keys (short text lengths, say). The plugin is
registered alone (with tuner's core defaults), as ``tuner run --plugin <family>`` would use it.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


class FamilyContract:
    family: str = ""
    plugin_module: str = ""  # dotted module of the plugin's hooks

    # -- what a subclass provides ------------------------------------------------------------

    @pytest.fixture(scope="class")
    def tiny_model(self, tmp_path_factory) -> Path:  # pragma: no cover - subclasses override
        raise NotImplementedError("FamilyContract subclasses provide a tiny_model fixture")

    def settings(self, model: Path, data: Path, out: Path) -> dict[str, Any]:
        """A config for a two-step CPU run; extend it with family keys."""
        return {
            "pretrained_model_name_or_path": str(model),
            "data_dir": str(data),
            "output_dir": str(out / "out"),
            "cache_dir": str(out / "cache"),
            "resolution": 64,
            "network_rank": 4,
            "lora_alpha": 8,
            "train_batch_size": 2,
            "max_train_steps": 2,
            "mixed_precision": "no",
            "gradient_checkpointing": True,
            "validation_prompt": "a red circle",
            "validation_num_inference_steps": 2,
            "report_to": "none",
        }

    # -- helpers -----------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    def dataset(self, tmp_path_factory) -> Path:
        from tuner.testing import shapes_dataset

        return shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", size=64)

    def host(self):
        from tuner.testing import make_host

        return make_host(("family-under-test", importlib.import_module(self.plugin_module)), family=self.family)

    def config(self, host, model: Path, data: Path, out: Path, **extra):
        from tuner.core.api import build_config

        return build_config(host, {**self.settings(model, data, out), **extra}, "contract", warn=lambda m: None)

    # -- the contract ------------------------------------------------------------------------

    def test_registers_the_family(self):
        host = self.host()
        info = host.family_info(self.family)
        assert info.flavours and info.default_flavour in info.flavours, "flavours must include the default"
        assert info.plugin == "family-under-test"

    def test_the_family_answers_the_hooks_a_run_needs(self):
        """The manifest and the implementation (FamilyInfo.implementation) together, and what the
        core answers from the family's record (loading, LoRA targets)."""
        host = self.host()
        host.hook  # noqa: B018 (registers the implementation, as a run's first hook call does)
        family = host.family_info(self.family)
        answered = set(host.hooks_of(family.plugin)) | set(host.hooks_of(f"{family.plugin}:implementation"))
        needed = {"encode_prompts", "predict_flow", "generate_images"}
        assert needed <= answered, f"the family does not implement {sorted(needed - answered)}"
        # answered by the core from the record, unless the family answers them itself
        assert "load_model" in answered or family.transformer_class, "declare transformer_class or load the model"
        assert "lora_target_modules" in answered or family.lora_target_key, (
            "declare lora_target_key and lora_presets, or implement lora_target_modules"
        )
        assert "example_text" in answered, "implement example_text so tuner estimate can count the family"

    def test_hook_module_does_not_import_heavy_libraries(self):
        code = f"import sys, {self.plugin_module}; print([m for m in {HEAVY!r} if m in sys.modules])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]", f"{self.plugin_module} imports {out.stdout.strip()} at module level"

    def test_loads_every_component_of_a_tiny_model(self, tiny_model, dataset, tmp_path):
        import torch

        host = self.host()
        config = self.config(host, tiny_model, dataset, tmp_path)
        for component in ("transformer", "vae", "text_encoders", "scheduler"):
            loaded = host.provide("load_model", config=config, component=component, dtype=torch.float32)
            assert loaded is not None, component

    def test_lora_targets_match_linear_modules(self, tiny_model, dataset, tmp_path):
        import torch

        from tuner.core.api import resolve_targets

        host = self.host()
        config = self.config(host, tiny_model, dataset, tmp_path)
        transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
        targets = host.provide("lora_target_modules", config=config, transformer=transformer)
        assert resolve_targets(transformer, targets), f"targets {targets!r} match no Linear module"

    def test_sigmas_lie_in_the_open_unit_interval(self, tiny_model, dataset, tmp_path):
        import torch

        host = self.host()
        config = self.config(host, tiny_model, dataset, tmp_path)
        sigmas = host.provide(
            "sample_sigmas",
            config=config,
            batch_size=4096,
            latent_shape=(4096, 16, 8, 8),
            generator=torch.Generator().manual_seed(0),
        )
        assert sigmas.shape == (4096,) and sigmas.dtype == torch.float32
        assert bool((sigmas > 0).all() and (sigmas <= 1).all()), "sigmas must lie in (0, 1]"

    def test_trains_a_step_and_the_saved_lora_round_trips(self, tiny_model, dataset, tmp_path):
        from tuner.core.api import Trainer

        host = self.host()
        trainer = Trainer(host, self.config(host, tiny_model, dataset, tmp_path), warn=lambda m: None)
        result = trainer.train()  # ends with the self-test: every file reread and compared
        assert result.steps == 2 and all(loss == loss for loss in result.losses)
        assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
        assert (result.validation_dirs[-1] / "00.png").is_file()

    def test_example_text_matches_a_real_encoding_and_the_estimate_runs(self, tiny_model, dataset, tmp_path):
        import torch

        from tuner.core.api import estimate

        host = self.host()
        config = self.config(host, tiny_model, dataset, tmp_path)
        transformer = host.provide("load_model", config=config, component="transformer", dtype=torch.float32)
        encoders = host.provide("load_model", config=config, component="text_encoders", dtype=torch.float32)
        real = host.provide(
            "encode_prompts",
            text_encoders=encoders,
            prompts=["a red circle", "a cat"],
            config=config,
            device=torch.device("cpu"),
            references=None,
        )
        example = host.provide(
            "example_text", config=config, transformer=transformer, batch_size=2, dtype=torch.float32
        )
        assert example is not None, "the family must implement example_text (tuner estimate needs it)"
        if host.family.text_lengths_vary:  # real encodings are as long as their longest prompt, at most the example
            assert all(real[k].shape[1] <= v.shape[1] for k, v in example.items() if k in real and v.dim() > 1)
            example = {k: v[:, : real[k].shape[1]] if k in real and v.dim() > 1 else v for k, v in example.items()}
        assert {k: (tuple(v.shape), v.dtype) for k, v in example.items()} == {
            k: (tuple(v.shape), v.dtype) for k, v in real.items()
        }, "example_text must match encode_prompts in keys, shapes and dtypes"
        found = estimate(host, config, "cpu")  # one training step and validation on fake tensors
        train = found.phase("train")
        assert train.parts["weights"] == sum(p.numel() * p.element_size() for p in transformer.parameters()) + sum(
            b.numel() * b.element_size() for b in transformer.buffers()
        )
        assert found.phase("validate") is not None and found.peak_device >= train.device
