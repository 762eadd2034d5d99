"""The core's own observers of training events: the JSONL training log and TensorBoard. Plugins
like any other (``training_event``), registered by the host with the core's defaults."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tuner.core import hookimpl
from tuner.core.config.keys.saving import trackers
from tuner.core.host import events


class JsonlLog:
    """Appends one JSON object per optimizer step (and per skip or rollback) to ``output_dir/train_log.jsonl``."""

    def __init__(self) -> None:
        self.file: Any = None
        self.started = 0.0

    @hookimpl
    def training_event(self, event):
        if isinstance(event, events.RunStart):
            path = Path(event.config.output_dir) / "train_log.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if event.resumed_step is not None and path.exists():  # drop what the interrupted run logged after it
                rows = [_parsed(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
                kept = [json.dumps(row) for row in rows if row is not None and row.get("step", 0) <= event.resumed_step]
                if None in rows:  # a line torn by kill -9 or a full disk: the log is repaired
                    event.log(f"warning: {path}: dropped {rows.count(None)} damaged line(s)")
            self.file = path.open("w", encoding="utf-8")
            self.file.writelines(line + "\n" for line in kept)
            self.started = time.monotonic()
        elif isinstance(event, (events.StepEnd, events.Skip, events.Rollback, events.Evaluation)) and self.file:
            record = {
                "step": event.step,
                **events.payload(event),
                "elapsed_s": round(time.monotonic() - self.started, 3),
            }
            if not isinstance(event, events.StepEnd):
                record["event"] = event.name
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        elif isinstance(event, events.RunEnd) and self.file is not None:
            self.file.close()
            self.file = None


def _parsed(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class TensorBoardLog:
    """Loss, learning rate, grad norm, sigma histogram and validation images to TensorBoard, through
    accelerate's tracker, in ``output_dir/logs``. On by default when tensorboard is installed."""

    REQUIRES = ("tensorboard",)  # what `tuner plugins` checks and names when missing
    INSTALL_HINT = "pip install tensorboard  (or: pip install 'tuner[tensorboard]')"

    def __init__(self) -> None:
        self.tracker: Any = None

    @hookimpl
    def training_event(self, event):
        if isinstance(event, events.RunStart):
            self.tracker = None
            if "tensorboard" not in trackers(event.config):
                return
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
                if event.config.is_set("report_to"):
                    event.log("warning: report_to: tensorboard is not installed (pip install tensorboard)")
                else:
                    event.log(
                        "note: TensorBoard logging is off: tensorboard is not installed (pip install tensorboard); "
                        "train_log.jsonl records every step"
                    )
                return
            from accelerate.tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker("tuner", Path(event.config.output_dir) / "logs")
            self.tracker.start()
        elif self.tracker is None:
            return
        elif isinstance(event, events.StepEnd):
            import torch

            scalars = {"loss": event.loss, "lr": event.lr, "sigma_mean": event.sigma}
            if event.grad_norm is not None:
                scalars["grad_norm"] = event.grad_norm
            self.tracker.log(scalars, step=event.step)
            self.tracker.writer.add_histogram("sigma", torch.tensor(event.sigmas), event.step)
        elif isinstance(event, events.Evaluation):
            self.tracker.log({"eval_loss": event.eval_loss}, step=event.step)
            for sigma, loss in zip(event.eval_sigmas, event.eval_losses, strict=True):
                self.tracker.log({f"eval_loss_by_sigma/{sigma:.3f}": loss}, step=event.step)
        elif isinstance(event, events.Validation):
            import numpy as np
            from PIL import Image

            by_size: dict[tuple[int, ...], list] = {}  # one image tensor per validation size
            for path in event.images:
                image = np.asarray(Image.open(path).convert("RGB"))
                by_size.setdefault(image.shape, []).append(image)
            for shape, images in by_size.items():
                tag = "validation" if len(by_size) == 1 else f"validation/{shape[1]}x{shape[0]}"
                self.tracker.writer.add_images(tag, np.stack(images), event.step, dataformats="NHWC")
        elif isinstance(event, events.RunEnd):
            self.tracker.finish()
            self.tracker = None
