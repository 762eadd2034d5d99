"""Stopping a run without losing it: Ctrl-C or SIGTERM (what schedulers, ``docker stop`` and a web
UI's stop send) asks for a stop at the end of the step, after which the Trainer saves a checkpoint;
a second signal stops at once. Every process agrees on whether to stop, so none waits forever for
another."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class StopRequest:
    """Whether a stop was asked for, by a signal or by :meth:`request` (tests, an embedding program)."""

    def __init__(self, log: Callable[[str], None]):
        self.asked = False
        self.log = log

    def request(self) -> None:
        self.asked = True

    def agreed(self, accelerator: Any) -> bool:
        """True when any process was asked to stop (a collective call: every process makes it)."""
        if accelerator.num_processes == 1:
            return self.asked
        flag = torch.tensor(float(self.asked), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)

    @contextmanager
    def on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM request a stop while inside (main thread only; elsewhere a no-op)."""

        def on_signal(signum, frame) -> None:
            self.request()
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.default_int_handler)  # the second one raises KeyboardInterrupt
            name = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
            self.log(f"{name}: finishing this step, then saving a checkpoint (again to abort)")

        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def interrupted_message(phase: str, step: int, last_good: str) -> str:
    """What a Ctrl-C outside the graceful stop (or a second one) interrupted, and what is safe."""
    if phase != "training":
        return f"interrupted while {phase}; nothing was trained yet" + (
            " (finished cache entries are kept)" if phase == "caching latents and captions" else ""
        )
    resume = "; continue with --set resume_from_checkpoint=latest" if last_good.startswith("checkpoint-") else ""
    return f"aborted at step {step} without saving; the last good checkpoint is {last_good}{resume}"
