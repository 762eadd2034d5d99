"""Keys of what a run writes and how it survives: the output folder, checkpoints, LoRA formats,
trackers, resuming and the divergence guard."""

from __future__ import annotations

from typing import Any

from tuner.core.host.records import ConfigKey, in_group

KEYS = in_group(
    "saving",
    (
        ConfigKey("output_dir", "path", "output", "Where the LoRA, checkpoints, samples and logs go."),
        ConfigKey(
            "checkpointing_steps",
            "int",
            0,
            "Save a full-state checkpoint (LoRA, optimizer, scheduler, RNG, data position) every N steps.",
            minimum=0,
            central=True,
        ),
        ConfigKey(
            "lora_format",
            "str_or_list",
            "diffusers",
            "LoRA file format(s) to write: diffusers, comfyui (Flux lineage), all, or a list; each is reloaded and "
            "checked.",
        ),
        ConfigKey(
            "report_to",
            "str_or_list",
            "tensorboard",
            "Trackers fed by training events: tensorboard (when installed), none, or a tracker plugin's name.",
        ),
        ConfigKey("checkpoints_total_limit", "int", None, "Keep only the newest N checkpoints.", minimum=1),
        ConfigKey(
            "existing_output",
            "str",
            "refuse",
            "When output_dir holds an earlier run (and resume_from_checkpoint is not set): refuse (say what is "
            "there), new (write to output_dir-2, -3, ...) or overwrite (remove that run's checkpoints, log, images "
            "and LoRA files, then start over there).",
            choices=("refuse", "new", "overwrite"),
        ),
        ConfigKey(
            "resume_from_checkpoint",
            "str",
            None,
            "'latest' (the newest intact checkpoint in output_dir) or a checkpoint folder.",
            in_form=False,
        ),
        ConfigKey(
            "divergence_skip_limit",
            "int",
            3,
            "Non-finite steps in a row (each skipped) before rolling back to the last good checkpoint.",
            minimum=1,
            group="optimisation",
        ),
        ConfigKey(
            "divergence_lr_factor",
            "float",
            0.5,
            "Learning-rate factor applied at each rollback.",
            minimum=0,
            maximum=1,
            group="optimisation",
        ),
        ConfigKey(
            "divergence_max_rollbacks",
            "int",
            2,
            "Rollbacks before the run stops as diverged.",
            minimum=0,
            group="optimisation",
        ),
    ),
)


def trackers(config: Any) -> list[str]:
    """``report_to`` as a list of tracker names (empty for none)."""
    value = config.report_to
    return [] if value in ("none", None) else [value] if isinstance(value, str) else list(value)
