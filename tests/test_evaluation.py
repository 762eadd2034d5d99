"""The held-out eval loss: fixed noise levels and noise, so it moves only when the LoRA does."""

from __future__ import annotations

import json

import pytest

from tuner.core.errors import ConfigError

from .conftest import base_settings, make_config, make_host, train


def eval_settings(tiny_chroma, shapes_dir, tmp_path, **extra):
    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(max_train_steps=6, eval_steps=2, eval_split=3, eval_sigma_levels=4, lora_dropout=0.2)
    settings.update(extra)
    return settings


def test_the_same_model_gives_the_same_eval_loss_every_time(tiny_chroma, shapes_dir, tmp_path, capsys):
    result, _, _ = train(eval_settings(tiny_chroma, shapes_dir, tmp_path, learning_rate=0.0))
    assert len(result.eval_losses) == 3  # steps 2, 4 and the end (6)
    assert len(set(result.eval_losses)) == 1  # learning_rate 0: the LoRA never changes, nor does the number
    out = capsys.readouterr().out
    assert "training 9 images" in out and "(3 held-out images)" in out  # 3 of the 12 held out
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("event") == "evaluation"]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert evals[0]["eval_sigmas"] == [0.125, 0.375, 0.625, 0.875]
    assert len(evals[0]["eval_losses"]) == 4 and evals[0]["eval_loss"] == pytest.approx(
        sum(evals[0]["eval_losses"]) / 4
    )


def test_the_eval_loss_moves_when_the_lora_learns(tiny_chroma, one_image_dir, tmp_path):
    settings = eval_settings(
        tiny_chroma, one_image_dir, tmp_path, eval_split=0, eval_data_dir=str(one_image_dir), learning_rate=1e-2
    )
    result, _, _ = train({**settings, "max_train_steps": 20, "eval_steps": 10})
    first, *_, last = result.eval_losses
    assert last < first  # trained on the image it is evaluated on: the held-out loss must fall here


def test_eval_settings_are_checked_with_the_config():
    host = make_host()
    with pytest.raises(ConfigError, match=r"eval_steps: needs held-out images: set eval_data_dir or eval_split"):
        make_config(host, {"eval_steps": 5})
    with pytest.raises(ConfigError, match=r"eval_split: set either eval_data_dir or eval_split, not both"):
        make_config(host, {"eval_steps": 5, "eval_split": 2, "eval_data_dir": "x"})
