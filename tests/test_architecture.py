"""The structure is part of the product: the core's layers, no import circle, no plugin imported by
the core, plugins on the public API, no private name used across modules, and a Trainer that stays
small. Each rule is checked here, and the layer rule is shown to fail on a planted upward import."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER_LINES = 300  # the Trainer, with every base class it inherits, stays under this many lines


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def contract(contract_id: str) -> dict:
    return next(c for c in pyproject()["tool"]["importlinter"]["contracts"] if c["id"] == contract_id)


def core_graph():
    import grimp

    return grimp.build_graph("tuner.core", "tuner.plugins", "tuner.testing", exclude_type_checking_imports=True)


def layer_violations(graph) -> set:
    """The layers contract of pyproject.toml applied to ``graph`` (grimp's own layer check)."""
    import grimp

    layers = []
    for line in contract("layers")["layers"]:
        tails = [part.strip().strip("()") for part in line.split("|")]
        layers.append(grimp.Layer(*tails, independent=True))
    return graph.find_illegal_dependencies_for_layers(layers=layers)


def test_every_import_linter_contract_is_kept(capsys):
    """What `lint-imports` checks: the layers, no circle within any package, no plugin in the core,
    plugins through tuner.core.api, the testing kit without tuner's families."""
    from importlinter import configuration
    from importlinter.application.use_cases import lint_imports

    configuration.configure()  # what the lint-imports command does first

    assert {c["id"] for c in pyproject()["tool"]["importlinter"]["contracts"]} >= {
        "layers",
        "acyclic",
        "no-plugins-in-core",
        "public-api",
        "kit-without-families",
    }
    kept = lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True)
    assert kept, capsys.readouterr().out[-3000:]


def test_the_layers_contract_refuses_a_planted_upward_import():
    graph = core_graph()
    assert layer_violations(graph) == set()
    graph.add_import(importer="tuner.core.config.values", imported="tuner.core.run.trainer")
    found = layer_violations(graph)
    assert {(d.importer, d.imported) for d in found} == {("tuner.core.config", "tuner.core.run")}


def test_a_planted_circle_inside_a_package_is_found():
    """What the acyclic_siblings contract asks grimp: the imports that would break every circle."""
    graph = core_graph()
    assert graph.nominate_cycle_breakers("tuner.core.data") == set()
    graph.add_import(importer="tuner.core.data.buckets", imported="tuner.core.data.cache")
    assert graph.nominate_cycle_breakers("tuner.core.data")  # cache imports buckets: now a circle


def test_the_trainer_stays_under_300_lines():
    """The Trainer reads top to bottom: data preparation, the step and its loss, stopping and
    reporting live in their own modules. Counted with every base class it inherits."""
    from tuner.core.run.trainer import Trainer

    lines = sum(len(inspect.getsourcelines(cls)[0]) for cls in Trainer.__mro__ if cls is not object)
    assert lines < TRAINER_LINES, (
        f"the Trainer (with its base classes) is {lines} lines; the rule is under {TRAINER_LINES}: move a "
        "concern into its own module (tuner.core.run.*, tuner.core.training.*)"
    )


def _python_files() -> list[Path]:
    roots = ["core", "plugins", "testing", "tests", "benchmarks", "examples/tuner-sd3", "examples/tuner-lion"]
    return [p for root in roots for p in (REPO / root).rglob("*.py")]


def private_uses(source: str) -> list[str]:
    """``from tuner... import _name`` and ``module._name`` for a tuner module imported by name."""
    tree = ast.parse(source)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tuner"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {node.module} import {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tuner"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules and base.id[0].islower():
                found.append(f"{ast.unparse(node)}")
    return found


def test_the_private_check_finds_what_it_looks_for():
    assert private_uses("from tuner.core.data.cache import _fingerprint") == [
        "from tuner.core.data.cache import _fingerprint"
    ]
    assert private_uses("from tuner.core import cli\ncli._register()") == ["cli._register"]
    assert private_uses("from tuner.core.config.values import Config\nConfig._x") == []  # a class: SLF001's job


def test_no_module_uses_another_modules_private_names():
    """Cross-module use of a ``_private`` name of tuner (ruff's SLF001 covers attributes of objects)."""
    found = [f"{p.relative_to(REPO)}: {use}" for p in _python_files() for use in private_uses(p.read_text())]
    assert found == []


def test_ruff_passes():
    """Lint is part of the suite, so CI keeps what ruff enforces: cheap hook modules (TID253), no
    private member of another object (SLF001), sorted imports, bugbear."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
