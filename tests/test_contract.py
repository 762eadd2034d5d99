"""The bundled families pass the same contract tests a third-party family runs (tuner.testing)."""

from __future__ import annotations

import pytest

from tuner.testing.contract import FamilyContract


class TestChromaContract(FamilyContract):
    family = "chroma"
    plugin_module = "tuner.plugins.chroma.plugin"

    @pytest.fixture(scope="class")
    def tiny_model(self, tiny_chroma):
        return tiny_chroma

    def settings(self, model, data, out):
        return {**super().settings(model, data, out), "tokenizer_max_length": 16}


class TestFluxContract(FamilyContract):
    family = "flux"
    plugin_module = "tuner.plugins.flux.plugin"

    @pytest.fixture(scope="class")
    def tiny_model(self, tiny_flux):
        return tiny_flux

    def settings(self, model, data, out):
        return {**super().settings(model, data, out), "tokenizer_max_length": 16, "validation_guidance_real": 1.0}


class TestTheKitsOwnFamilyContract(FamilyContract):
    """tuner.testing's miniature family is a whole family: what the kits train is held to the
    contract every family passes."""

    family = "testing"
    plugin_module = "tuner.testing.family"

    @pytest.fixture(scope="class")
    def tiny_model(self, kit_model):
        return kit_model
