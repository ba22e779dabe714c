"""Schedules counted in optimiser steps and the warm-up + cosine-with-restarts LR scheduler."""

from __future__ import annotations

import math
import pickle

import pytest

pytestmark = pytest.mark.train
th = pytest.importorskip("torch")

from sb3_warmstart.algorithms.schedules import (  # noqa: E402
    EntropyCoefficient,
    LinearDecay,
    build_lr_scheduler,
)
from sb3_warmstart.pipeline.config import LearningRateScheduleConfig  # noqa: E402


def LRScheduleConfig(**fields) -> LearningRateScheduleConfig:  # noqa: N802
    """The cosine-with-warm-up schedule with ``fields`` (others: the config's defaults)."""
    return LearningRateScheduleConfig(type="cosine_annealing_with_warmup", **fields)


def test_linear_decay_values_and_clamp():
    decay = LinearDecay(1.0, 0.2, 10)
    assert decay(0) == 1.0
    assert decay(5) == pytest.approx(0.6)
    assert decay(9) == pytest.approx(0.28)
    assert decay(10) == 0.2
    assert decay(1000) == 0.2
    assert LinearDecay(0.5, 0.0, 0)(0) == 0.0  # no ramp: final at once
    increasing = LinearDecay(0.0, 2.0, 4)
    assert [increasing(t) for t in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]
    with pytest.raises(ValueError, match="steps=-1"):
        LinearDecay(1.0, 0.0, -1)
    with pytest.raises(ValueError, match="step=-3"):
        decay(-3)


def test_entropy_coefficient_switches_at_warmup_end():
    coef = EntropyCoefficient(base=0.01, warmup_coef=0.5, warmup_steps=3)
    assert [coef(t) for t in range(5)] == [0.5, 0.5, 0.5, 0.01, 0.01]
    assert EntropyCoefficient(0.01, None, 10)(0) == 0.01
    with pytest.raises(ValueError, match="warmup_steps=1.5"):
        EntropyCoefficient(0.0, 0.1, 1.5)


def test_schedules_pickle_and_repr():
    for schedule in (LinearDecay(1.0, 0.0, 7), EntropyCoefficient(0.0, 0.3, 2)):
        clone = pickle.loads(pickle.dumps(schedule))
        assert [clone(t) for t in range(10)] == [schedule(t) for t in range(10)]
        assert repr(clone) == repr(schedule)
    assert repr(LinearDecay(1.0, 0.0, 7)) == "LinearDecay(initial=1.0, final=0.0, steps=7)"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="restart_period=0"):
        LRScheduleConfig(restart_period=0)
    with pytest.raises(ValueError, match="min_lr_ratio=1.5"):
        LRScheduleConfig(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="period_multiplier=0"):
        LRScheduleConfig(period_multiplier=0)
    with pytest.raises(ValueError, match="warmup_start_factor=0.0"):
        LRScheduleConfig(warmup_start_factor=0.0)


def _optimizer(lr: float) -> th.optim.Optimizer:
    return th.optim.Adam([th.nn.Parameter(th.zeros(2))], lr=lr)


def _run(optimizer, scheduler, steps: int) -> list[float]:
    """The LR used by each of the next ``steps`` optimiser steps."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def _expected_lr(t: int, lr: float, cfg: LRScheduleConfig) -> float:
    """The closed form of the module docstring."""
    if t < cfg.warmup_steps:
        s = cfg.warmup_start_factor
        return lr * (s + (1 - s) * t / cfg.warmup_steps)
    t_cur, t_i = t - cfg.warmup_steps, cfg.restart_period
    while t_cur >= t_i:
        t_cur -= t_i
        t_i *= cfg.period_multiplier
    eta_min = cfg.min_lr_ratio * lr
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2


@pytest.mark.train
@pytest.mark.parametrize("multiplier", [1, 2])
def test_warmup_then_cosine_with_restarts(multiplier):
    lr = 3e-4
    cfg = LRScheduleConfig(warmup_steps=10, restart_period=20, min_lr_ratio=0.1,
                           period_multiplier=multiplier)
    optimizer = _optimizer(lr)
    lrs = _run(optimizer, build_lr_scheduler(optimizer, cfg), 120)
    assert lrs == pytest.approx([_expected_lr(t, lr, cfg) for t in range(120)], rel=1e-9)
    # warm-up ramp from ~0 to lr
    assert lrs[0] == pytest.approx(1e-3 * lr)
    assert lrs[5] == pytest.approx(lr * (1e-3 + (1 - 1e-3) * 0.5))
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))
    assert lrs[10] == pytest.approx(lr)  # first cosine step uses the full rate
    # every step of the cosine stays in [eta_min, lr] and the first period decreases
    eta_min = 0.1 * lr
    assert min(lrs[10:]) >= eta_min - 1e-15 and max(lrs) <= lr + 1e-15
    assert all(a > b for a, b in zip(lrs[10:29], lrs[11:30]))
    # last step of the first period is the cosine at T_cur = T_0 - 1, then restart to lr
    assert lrs[29] == pytest.approx(eta_min + (lr - eta_min) * (1 + math.cos(math.pi * 19 / 20)) / 2)
    assert lrs[30] == pytest.approx(lr)
    second_restart = 10 + 20 + 20 * multiplier
    assert lrs[second_restart] == pytest.approx(lr)
    assert lrs[second_restart - 1] < 0.11 * lr


@pytest.mark.train
def test_cosine_minimum_is_min_lr_ratio_times_lr():
    """The cosine approaches eta_min = min_lr_ratio * lr at the end of a period (it reaches
    it in the limit; the gap at the last step is (lr - eta_min) * (1 - cos(pi / T)) / 2)."""
    lr, ratio, period = 1e-3, 0.05, 2000
    optimizer = _optimizer(lr)
    lrs = _run(optimizer, build_lr_scheduler(
        optimizer, LRScheduleConfig(warmup_steps=0, restart_period=period, min_lr_ratio=ratio)),
        period + 1)
    assert lrs[0] == lr
    assert min(lrs) == lrs[period - 1]
    gap = (lr - ratio * lr) * (1 - math.cos(math.pi / period)) / 2
    assert lrs[period - 1] - ratio * lr == pytest.approx(gap, rel=1e-6)
    assert lrs[period - 1] == pytest.approx(ratio * lr, rel=2e-5)
    assert lrs[period] == pytest.approx(lr)


@pytest.mark.train
def test_state_dict_round_trip_continues_exactly():
    lr = 5e-4
    cfg = LRScheduleConfig(warmup_steps=7, restart_period=11, min_lr_ratio=0.2, period_multiplier=2)
    optimizer = _optimizer(lr)
    scheduler = build_lr_scheduler(optimizer, cfg)
    _run(optimizer, scheduler, 25)
    saved = pickle.loads(pickle.dumps((optimizer.state_dict(), scheduler.state_dict())))
    expected = _run(optimizer, scheduler, 100)

    resumed_optimizer = _optimizer(lr)
    resumed = build_lr_scheduler(resumed_optimizer, cfg)
    resumed_optimizer.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    assert _run(resumed_optimizer, resumed, 100) == expected

    # a resume in the warm-up phase as well
    optimizer = _optimizer(lr)
    scheduler = build_lr_scheduler(optimizer, cfg)
    _run(optimizer, scheduler, 3)
    saved = (optimizer.state_dict(), scheduler.state_dict())
    expected = _run(optimizer, scheduler, 100)
    resumed_optimizer = _optimizer(lr)
    resumed = build_lr_scheduler(resumed_optimizer, cfg)
    resumed_optimizer.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    assert _run(resumed_optimizer, resumed, 100) == expected
