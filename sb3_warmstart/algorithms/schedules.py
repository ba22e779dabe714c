"""Picklable schedules counted in optimiser (minibatch) steps, and the per-step LR scheduler.

* :class:`LinearDecay` -- a value moving linearly from ``initial`` to ``final`` over ``steps``
  steps, then held (the reference-KL coefficient).
* :class:`EntropyCoefficient` -- ``warmup_coef`` for the first ``warmup_steps`` steps, then
  ``base`` (entropy warm-up).
* :func:`build_lr_scheduler` (from :class:`~sb3_warmstart.pipeline.config.LearningRateScheduleConfig`,
  where its knobs and their defaults live) -- linear warm-up followed by cosine
  annealing with warm restarts, composed from ``torch.optim.lr_scheduler`` (``LinearLR``,
  ``CosineAnnealingWarmRestarts``, ``SequentialLR``). The scheduler is stepped once per
  optimiser step; its ``state_dict()`` restores it exactly.

Step ``t`` counts optimiser steps already taken, so ``schedule(0)`` is the value used for the
first step. With base rate ``lr``, warm-up length ``W``, start factor ``s``, period ``T_0``,
multiplier ``m`` and ``eta_min = min_lr_ratio * lr``, the LR used by step ``t`` is::

    t < W:  lr * (s + (1 - s) * t / W)
    t >= W: eta_min + (lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2

where ``T_cur`` counts steps since the last restart (``t - W`` within the first period) and the
period ``T_i`` starts at ``T_0`` and is multiplied by ``m`` at every restart. The first step of
each period uses ``lr``; the LR approaches ``eta_min`` at the end of a period without reaching
it (the last step of a period uses ``T_cur = T_i - 1``).
"""

from __future__ import annotations

from typing import Any

import torch as th
from torch.optim.lr_scheduler import (
    CosineAnnealingWarmRestarts,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

from sb3_warmstart.pipeline.config import LearningRateScheduleConfig


def _check_steps(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return value


class LinearDecay:
    """``initial`` at step 0, moving linearly to ``final`` at step ``steps``, then held.

    :param initial: value at step 0.
    :param final: value from step ``steps`` on.
    :param steps: length of the ramp in optimiser steps (>= 0; 0 means ``final`` at once).
    """

    def __init__(self, initial: float, final: float, steps: int) -> None:
        self.initial = float(initial)
        self.final = float(final)
        self.steps = _check_steps("steps", steps)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step={step!r}: must be >= 0")
        if step >= self.steps:
            return self.final
        return self.initial + (self.final - self.initial) * (step / self.steps)

    def __repr__(self) -> str:
        return f"LinearDecay(initial={self.initial!r}, final={self.final!r}, steps={self.steps!r})"


class EntropyCoefficient:
    """Entropy coefficient with a warm-up: ``warmup_coef`` for steps ``0 .. warmup_steps - 1``,
    ``base`` afterwards (always ``base`` when ``warmup_coef`` is None).

    :param base: the entropy coefficient after warm-up (PPO's ``ent_coef``).
    :param warmup_coef: the coefficient during warm-up, or None for no warm-up.
    :param warmup_steps: warm-up length in optimiser steps (>= 0).
    """

    def __init__(self, base: float, warmup_coef: float | None, warmup_steps: int) -> None:
        self.base = base
        self.warmup_coef = warmup_coef
        self.warmup_steps = _check_steps("warmup_steps", warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_coef is not None and step < self.warmup_steps:
            return self.warmup_coef
        return self.base

    def __repr__(self) -> str:
        return (f"EntropyCoefficient(base={self.base!r}, warmup_coef={self.warmup_coef!r}, "
                f"warmup_steps={self.warmup_steps!r})")


def build_lr_scheduler(optimizer: th.optim.Optimizer,
                       config: LearningRateScheduleConfig) -> LRScheduler:
    """The per-optimiser-step LR scheduler described in the module docstring.

    Build it on a fresh optimiser whose ``lr`` is the base rate (it becomes each group's
    ``initial_lr``); call ``scheduler.step()`` right after every ``optimizer.step()``. To resume,
    rebuild it the same way, restore the optimiser's state dict, then the scheduler's.

    :param optimizer: the optimiser whose learning rate is driven.
    :param config: the schedule (validated by the dataclass).
    """
    if not isinstance(config, LearningRateScheduleConfig):
        raise TypeError(f"config: expected a LearningRateScheduleConfig, got "
                        f"{type(config).__name__}")
    cfg = config
    base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    if len(set(base_lrs)) != 1:
        raise ValueError(f"optimizer: param groups have different learning rates {base_lrs}; "
                         f"eta_min = min_lr_ratio * lr needs a single base rate")
    eta_min = cfg.min_lr_ratio * base_lrs[0]
    cosine_kwargs = dict(T_0=cfg.restart_period, T_mult=cfg.period_multiplier, eta_min=eta_min)
    if cfg.warmup_steps == 0:
        return CosineAnnealingWarmRestarts(optimizer, **cosine_kwargs)
    warmup = LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0,
                      total_iters=cfg.warmup_steps)
    cosine = CosineAnnealingWarmRestarts(optimizer, **cosine_kwargs)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[cfg.warmup_steps])
