"""tuner's web UI (``tuner server``): a plugin that adds one command; the CLI stays the only way runs happen."""
