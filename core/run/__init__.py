"""A run: the Trainer (read :mod:`tuner.core.run.trainer` top to bottom) and the rooms it
delegates to (data preparation, stop handling, progress), validation, the eval loss, and
rendering from a recipe (``tuner sample``)."""
