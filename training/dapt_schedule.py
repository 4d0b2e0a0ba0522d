"""How long a DAPT run lasts and how its learning rate moves: the run's steps and the warm-up/cosine factor."""
from __future__ import annotations

import math

from .dapt_config import DEFAULT_MAX_EPOCHS, DaptConfig


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Share of the peak learning rate used by optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up reaching 1 at step ``warmup - 1``, then cosine decay to 0 at ``total``.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_steps(config: DaptConfig, steps_per_epoch: int) -> tuple:
    """(optimizer steps of the run, max_epochs for Lightning, which limit ends it).

    An explicit ``max_steps`` alone is never cut by an epoch limit; with neither limit given the
    run lasts paper 000's 10 epochs; with both, the earlier wins.
    """
    steps = int(config.max_steps) if config.max_steps and config.max_steps > 0 else None
    epochs = int(config.max_epochs) if config.max_epochs else None
    if steps is None and epochs is None:
        return steps_per_epoch * DEFAULT_MAX_EPOCHS, DEFAULT_MAX_EPOCHS, f"max_epochs (default {DEFAULT_MAX_EPOCHS})"
    if epochs is None:
        return steps, -1, "max_steps"
    if steps is None:
        return steps_per_epoch * epochs, epochs, "max_epochs"
    by_epochs = steps_per_epoch * epochs
    if by_epochs < steps:
        return by_epochs, epochs, "max_epochs"
    return steps, epochs, "max_steps"
