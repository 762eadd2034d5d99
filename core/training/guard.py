"""The divergence guard: skip non-finite steps, roll back after too many in a row, stop when rolling
back no longer helps. It owns its counters; checkpoints store them (``state_dict``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuner.core.errors import Diverged


@dataclass
class DivergenceGuard:
    skip_limit: int  # non-finite steps in a row before a rollback
    lr_factor: float  # learning-rate factor applied at each rollback
    max_rollbacks: int
    consecutive: int = 0  # non-finite steps in a row, now
    rollbacks: int = 0  # rollbacks so far; part of every step's seed, so a retry draws new noise
    lr_scale: float = 1.0  # the learning rate relative to the configured one

    @classmethod
    def from_config(cls, config: Any) -> DivergenceGuard:
        return cls(config.divergence_skip_limit, config.divergence_lr_factor, config.divergence_max_rollbacks)

    def finite_step(self) -> None:
        self.consecutive = 0

    def skipped_step(self) -> bool:
        """Count a dropped step; True when the run must roll back now."""
        self.consecutive += 1
        return self.consecutive >= self.skip_limit

    def begin_rollback(self, next_step: int) -> float:
        """Count a rollback and return the new learning-rate scale; raise :class:`Diverged` when
        the configured rollbacks are used up."""
        if self.rollbacks >= self.max_rollbacks:
            raise Diverged(
                f"training diverged: {self.consecutive} non-finite steps in a row at step {next_step} "
                f"after {self.rollbacks} rollback(s); lower learning_rate (now x{self.lr_scale:g}), check the data, "
                "or raise divergence_max_rollbacks"
            )
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        self.consecutive = 0
        return self.lr_scale

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks, self.lr_scale, self.consecutive = int(state["rollbacks"]), float(state["lr_scale"]), 0
