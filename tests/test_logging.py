"""Training logs: the JSONL log and TensorBoard (through accelerate's tracker), both plugins."""

from __future__ import annotations

from .conftest import base_settings, train


def test_tensorboard_gets_scalars_sigma_histograms_and_validation_images(tiny_chroma, shapes_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    settings = base_settings(tiny_chroma, shapes_dir, tmp_path)
    settings.update(
        max_train_steps=4,
        validation_steps=2,
        validation_prompt="a red circle",
        validation_num_inference_steps=2,
        train_batch_size=2,
    )
    train(settings)
    runs = list((tmp_path / "out" / "logs").rglob("events.out.tfevents.*"))
    assert len(runs) == 1
    events = EventAccumulator(str(runs[0].parent), size_guidance={"images": 0, "histograms": 0}).Reload()
    assert {"loss", "lr", "sigma_mean", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    histograms = events.Histograms("sigma")
    assert [h.step for h in histograms] == [1, 2, 3, 4] and all(h.histogram_value.num == 2 for h in histograms)
    assert [i.step for i in events.Images("validation")] == [2, 4]


def test_report_to_none_writes_no_tensorboard_files(tiny_chroma, shapes_dir, tmp_path):
    train({**base_settings(tiny_chroma, shapes_dir, tmp_path), "report_to": "none", "max_train_steps": 2})
    assert not (tmp_path / "out" / "logs").exists()
    assert len((tmp_path / "out" / "train_log.jsonl").read_text().splitlines()) == 2  # the JSONL log stays
