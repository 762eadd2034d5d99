"""compile: true (regional compilation) trains what eager trains. On the CPU the test uses the
aot_eager backend (graph capture and compiled autograd without generating code, which takes ~30 s
for the tiny model with inductor); GPU speed is measured by benchmarks/gpu.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tuner.core import hookimpl
from tuner.core.host.events import RunStart

from .conftest import base_settings, train


class Blocks:
    """Counts the compiled blocks of the trained model (from RunStart, which carries it)."""

    compiled = -1

    @hookimpl
    def training_event(self, event):
        if isinstance(event, RunStart):
            model = event.model
            repeated = set(model._repeated_blocks)
            blocks = [m for m in model.modules() if type(m).__name__ in repeated]
            Blocks.compiled = sum(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)
            Blocks.total = len(blocks)


@pytest.mark.slow
def test_regional_compilation_trains_the_same_losses_as_eager(tiny_chroma, shapes_dir, tmp_path, monkeypatch):
    from tqdm.auto import tqdm

    logged: list[str] = []
    monkeypatch.setattr(tqdm, "write", lambda message, *a, **kw: logged.append(message))
    settings = {
        **base_settings(tiny_chroma, shapes_dir, tmp_path),
        "max_train_steps": 4,
        "gradient_checkpointing": True,
    }
    eager, _, _ = train({**settings, "output_dir": str(tmp_path / "eager")})
    compiled, _, _ = train({**settings, "compile": True, "compile_backend": "aot_eager"}, ("blocks", Blocks()))
    assert Blocks.compiled == Blocks.total > 0  # every repeated block, and nothing else
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=1e-5)
    a = load_file(tmp_path / "eager" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()  # module names unchanged: the export and its self-test passed
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
    assert any(line.startswith("compile: the first step took ") for line in logged)
