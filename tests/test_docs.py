"""The hook reference is generated from the hookspecs and must not drift from them."""

from __future__ import annotations

import importlib.util

from tuner.core.host import hookspecs

from .conftest import REPO


def test_hook_reference_is_up_to_date():
    spec = importlib.util.spec_from_file_location("gen", REPO / "docs" / "gen_hook_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (REPO / "docs" / "hooks.md").read_text() == gen.render(), "run: python docs/gen_hook_reference.py"


def test_every_hook_is_documented_and_in_the_run_diagram():
    reference = (REPO / "docs" / "hooks.md").read_text()
    guide = (REPO / "docs" / "plugins.md").read_text()
    for name, function in vars(hookspecs).items():
        if hasattr(function, "tuner_spec"):
            assert f"## `{name}`" in reference, name
            assert name in guide, f"{name} missing from the diagram in docs/plugins.md"
            assert (function.__doc__ or "").count("\n") >= 2, f"{name} needs a docstring saying when it is called"
