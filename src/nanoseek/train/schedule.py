"""Learning-rate schedules, as plain functions of the step.

`wsd` is DeepSeek-V3's shape (section 4.2): linear warm-up, a long constant phase, a cosine
decay to the low rate, then a short tail held there (V3: 2.2e-4 constant, cosine to 2.2e-5,
tail at 2.2e-5 then 7.3e-6). `cosine` is warm-up then cosine decay over all remaining steps.
The schedule has no state: the step in the checkpoint is enough to resume it.
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    total: int,
    lr: float,
    min_lr: float,
    warmup: int,
    schedule: str = "wsd",
    decay_fraction: float = 0.3,
    tail_fraction: float = 0.0,
) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        decay_start, decay_end = warmup, total
    elif schedule == "wsd":
        decay_end = total - round(tail_fraction * total)
        decay_start = max(warmup, decay_end - round(decay_fraction * total))
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    if step < decay_start:
        return lr
    if step >= decay_end:
        return min_lr
    progress = (step - decay_start) / max(decay_end - decay_start, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_for(cfg, step: int) -> float:
    """lr_at with the keys of a TrainConfig."""
    return lr_at(
        step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.schedule, cfg.decay_fraction, cfg.tail_fraction
    )
