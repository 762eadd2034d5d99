"""``python -m tuner.core.cli``: what ``accelerate launch -m tuner.core.cli`` and the web UI's jobs run."""

from tuner.core.cli import main

main()
