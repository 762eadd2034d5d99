"""Errors that reach the user as one line (the CLI prints ``error: <message>`` and exits 2)."""

from __future__ import annotations


class TunerError(Exception):
    """Base class of every error meant for the user; its message is one self-contained line."""


class ConfigError(TunerError):
    """A config file, key or value is wrong. The message names the file and key; a config with
    several wrong keys gets one line per key (the CLI prints each as an error line)."""


class PluginError(TunerError):
    """A plugin is missing, broken or conflicts with another. The message names its distribution."""


class DataError(TunerError):
    """The dataset or a cache is unusable. The message names the folder or file."""


class Interrupted(TunerError):
    """Ctrl-C during training: a checkpoint was saved and the run stopped cleanly (exit 130)."""


class Diverged(TunerError):
    """Non-finite losses or gradients that the configured rollbacks could not cure."""


def warn_user(message: str) -> None:
    """Print a one-line warning for the user on stderr."""
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
