"""`tuner run --processes N`: N training processes on this machine, started by accelerate's own
launcher (torch's elastic agent underneath), with every launcher option given so accelerate warns
about none, and a child's failure said in one line instead of the launcher's traceback.

Each process runs ``tuner run`` with the same arguments (``-m tuner.core.cli``), so what one
process does is what the processes do under ``accelerate launch`` or ``torchrun``.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Any

from tuner.core.errors import TunerError

# set for the processes: the launcher has said the config's warnings already
SAID_BY_LAUNCHER = "TUNER_LAUNCHED"
# the parent's loggers that narrate a child's failure at length (the child has said why)
NOISY_LOGGERS = ("torch.distributed.elastic", "torch.distributed.run", "accelerate")


def under_a_launcher() -> bool:
    """Already one of several processes (accelerate launch, torchrun): never launch again."""
    return "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _quiet_loggers():
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def launch(processes: int, run_arguments: list[str]) -> None:
    """Start ``tuner <run_arguments>`` in ``processes`` processes and wait for them."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if under_a_launcher():
        raise TunerError("--processes: this is already one of several processes (accelerate launch or torchrun)")
    # one process per core share, said here so torch does not warn that it picks 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    os.environ[SAID_BY_LAUNCHER] = "1"
    options = [
        "--multi_gpu",
        *("--num_processes", str(processes), "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no"),  # tuner's config sets its own precision
        *("--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())),
        *("-m", "tuner.core.cli", *run_arguments),
    ]
    args = launch_command_parser().parse_args(options)
    try:
        with _quiet_loggers():
            launch_command(args)
    except ChildFailedError as exc:
        raise TunerError(f"{processes} processes: {_first_failure(exc)}; its own message is above") from None


def _first_failure(exc: Any) -> str:
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return "a process stopped"
    rank, failure = min(failures.items())
    code = getattr(failure, "exitcode", "?")
    return f"process {rank} stopped with exit code {code}"
