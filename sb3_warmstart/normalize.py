"""``VecNormalize`` whose observation statistics can come from behaviour cloning and be frozen.

A warm-started policy was cloned on observations normalised with the demonstrations' statistics;
if PPO's ``VecNormalize`` kept updating its observation mean and variance, the cloned network's
inputs would silently change meaning. The smallest change to Stable-Baselines3 that prevents it
is a :class:`FrozenRunningMeanStd` -- a ``RunningMeanStd`` whose updates are no-ops while
``frozen`` -- assigned to ``VecNormalize.obs_rms``. Reward statistics (``ret_rms``) are untouched
and keep updating. The class lives at module level, so it survives ``VecNormalize.save``/``load``
(pickling) and ``set_venv`` with its values and its flag, and ``sync_envs_normalization`` copies
it like the stock class.

Typical use::

    venv = make_vec_normalize(venv, obs_rms=bc_obs_rms, freeze_obs=True, gamma=model_gamma)
    ...
    freeze_obs_stats(venv, False)   # let the observation statistics adapt again
"""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecNormalize


def checked_moments(stats: RunningMeanStd, what: str = "obs_rms") -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``stats.mean`` and ``stats.var`` (float64) after checking they have one shape,
    are finite and the variance is >= 0; ``ValueError`` naming ``what`` otherwise."""
    mean = np.array(stats.mean, dtype=np.float64)
    var = np.array(stats.var, dtype=np.float64)
    if mean.shape != var.shape:
        raise ValueError(f"{what}: mean.shape={mean.shape} differs from var.shape={var.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
        raise ValueError(f"{what}: mean and var must be finite and var >= 0")
    return mean, var


class FrozenRunningMeanStd(RunningMeanStd):
    """``RunningMeanStd`` that ignores updates while ``frozen`` is True.

    Both ``update`` and ``update_from_moments`` (hence ``combine``) are no-ops while frozen;
    assigning ``mean``/``var``/``count`` directly still works.

    :param epsilon: initial pseudo-count (as in the parent class).
    :param shape: shape of one observation.
    :param frozen: whether updates are ignored.
    """

    def __init__(self, epsilon: float = 1e-4, shape: tuple[int, ...] = (),
                 frozen: bool = False) -> None:
        super().__init__(epsilon=epsilon, shape=shape)
        self.frozen = bool(frozen)

    @classmethod
    def from_stats(cls, stats: RunningMeanStd, *, frozen: bool = False) -> FrozenRunningMeanStd:
        """A copy of ``stats`` (any object with ``mean``, ``var``, ``count``).

        :param stats: the statistics to copy; they are not aliased.
        :param frozen: whether the copy ignores updates.
        """
        mean, var = checked_moments(stats)
        count = float(stats.count)
        if not count > 0:
            raise ValueError(f"obs_rms.count={count!r}: must be > 0")
        new = cls(shape=mean.shape, frozen=frozen)
        new.mean, new.var, new.count = mean, var, count
        return new

    def copy(self) -> FrozenRunningMeanStd:
        """A copy that keeps the class and the ``frozen`` flag."""
        return FrozenRunningMeanStd.from_stats(self, frozen=self.frozen)

    def update_from_moments(self, batch_mean: np.ndarray, batch_var: np.ndarray,
                            batch_count: float) -> None:
        if self.frozen:
            return
        super().update_from_moments(batch_mean, batch_var, batch_count)

    def __repr__(self) -> str:
        return (f"FrozenRunningMeanStd(shape={self.mean.shape}, count={self.count:g}, "
                f"frozen={self.frozen})")


def make_vec_normalize(
    venv: VecEnv,
    *,
    gamma: float,
    obs_rms: RunningMeanStd | None = None,
    freeze_obs: bool = False,
    norm_reward: bool = True,
    clip_obs: float = 10.0,
    clip_reward: float = 10.0,
) -> VecNormalize:
    """Wrap ``venv`` in SB3's ``VecNormalize`` with a freezable observation normaliser.

    :param venv: the vectorised environment (flat ``Box`` observations).
    :param gamma: discount factor of the reward normaliser's running return; use the
        algorithm's ``gamma`` (no default on purpose).
    :param obs_rms: initial observation statistics (e.g. from behaviour cloning), copied; their
        shape must equal the observation shape. ``None`` starts from mean 0, variance 1.
    :param freeze_obs: start with the observation statistics frozen (requires ``obs_rms``:
        freezing the default statistics would disable normalisation).
    :param norm_reward: normalise rewards by the running std of the discounted return.
    :param clip_obs: normalised observations are clipped to ``[-clip_obs, clip_obs]`` (std units).
    :param clip_reward: normalised rewards are clipped to ``[-clip_reward, clip_reward]``.
    :return: a ``VecNormalize`` in training mode whose ``obs_rms`` is a
        :class:`FrozenRunningMeanStd`.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma={gamma!r}: must be in [0, 1]")
    if not clip_obs > 0:
        raise ValueError(f"clip_obs={clip_obs!r}: must be > 0")
    if not clip_reward > 0:
        raise ValueError(f"clip_reward={clip_reward!r}: must be > 0")
    if freeze_obs and obs_rms is None:
        raise ValueError("freeze_obs=True needs obs_rms: frozen default statistics "
                         "(mean 0, var 1) would leave observations unnormalised")
    vec_normalize = VecNormalize(venv, training=True, norm_obs=True, norm_reward=norm_reward,
                                 clip_obs=clip_obs, clip_reward=clip_reward, gamma=gamma)
    shape = vec_normalize.observation_space.shape
    if obs_rms is None:
        vec_normalize.obs_rms = FrozenRunningMeanStd(shape=shape, frozen=False)
    else:
        stats = FrozenRunningMeanStd.from_stats(obs_rms, frozen=freeze_obs)
        if stats.mean.shape != shape:
            raise ValueError(f"obs_rms.mean.shape={stats.mean.shape} does not match the "
                             f"observation shape {shape}")
        vec_normalize.obs_rms = stats
    return vec_normalize


def freeze_obs_stats(vec_normalize: VecNormalize, frozen: bool) -> None:
    """Freeze (``True``) or unfreeze the observation statistics of ``vec_normalize`` in place.

    A stock ``RunningMeanStd`` (e.g. from a plain ``VecNormalize``) is replaced by a
    :class:`FrozenRunningMeanStd` with the same values; dict observation spaces are handled key
    by key. Reward statistics are not affected.

    :param vec_normalize: the normaliser (must normalise observations).
    :param frozen: whether observation statistics ignore updates from now on.
    """
    if not isinstance(vec_normalize, VecNormalize):
        raise TypeError(f"vec_normalize: expected a VecNormalize, got {type(vec_normalize)!r}")
    if not vec_normalize.norm_obs:
        raise ValueError("vec_normalize.norm_obs=False: there are no observation statistics "
                         "to freeze")
    if isinstance(vec_normalize.obs_rms, dict):
        vec_normalize.obs_rms = {key: _freezable(rms, frozen)
                                 for key, rms in vec_normalize.obs_rms.items()}
    else:
        vec_normalize.obs_rms = _freezable(vec_normalize.obs_rms, frozen)


def obs_stats_frozen(vec_normalize: VecNormalize) -> bool:
    """Whether all observation statistics of ``vec_normalize`` are frozen."""
    if not vec_normalize.norm_obs:
        return False
    stats = vec_normalize.obs_rms
    values = stats.values() if isinstance(stats, dict) else [stats]
    return all(getattr(rms, "frozen", False) for rms in values)


def _freezable(rms: RunningMeanStd, frozen: bool) -> FrozenRunningMeanStd:
    if isinstance(rms, FrozenRunningMeanStd):
        rms.frozen = bool(frozen)
        return rms
    return FrozenRunningMeanStd.from_stats(rms, frozen=frozen)
