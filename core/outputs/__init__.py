"""The run's files: full-state checkpoints (atomic, verified, pickle-free), resume and rollback,
the LoRA files and their self-test, and ``run.json`` / ``config.yaml`` with the output folder's
lock."""
