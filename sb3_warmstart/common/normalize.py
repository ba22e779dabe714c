"""``VecNormalize`` whose observation statistics can come from behaviour cloning and be frozen.

A warm-started policy was cloned on observations normalised with the demonstrations' statistics;
if PPO's ``VecNormalize`` kept updating its observation mean and variance, the cloned network's
inputs would silently change meaning. The smallest change to Stable-Baselines3 that prevents it
is a :class:`FrozenRunningMeanStd` -- a ``RunningMeanStd`` whose updates are no-ops while
``frozen`` -- assigned to ``VecNormalize.obs_rms``. Reward statistics (``ret_rms``) are untouched
and keep updating. The class lives at module level, so it survives ``VecNormalize.save``/``load``
(pickling) and ``set_venv`` with its values and its flag, and ``sync_envs_normalization`` copies
it like the stock class.

The same transforms with frozen statistics, outside the wrapper, live here too:
:class:`ObsNormalizer` (what behaviour cloning trains on and what a saved policy routes with) and
:class:`ReturnNormalizer` (value pretraining), fitted on demonstrations by
:func:`fit_obs_normalizer` / :func:`fit_return_normalizer`. Loading or evaluating a policy needs
only this module, not the BC trainer.

Typical use::

    venv = make_vec_normalize(venv, obs_rms=bc_obs_rms, freeze_obs=True, gamma=model_gamma)
    ...
    freeze_obs_stats(venv, False)   # let the observation statistics adapt again
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

if TYPE_CHECKING:  # pragma: no cover
    from imitation.data.types import Trajectory

# VecNormalize's defaults (stable_baselines3 2.9, common/vec_env/vec_normalize.py).
VECNORMALIZE_CLIP_OBS = 10.0
VECNORMALIZE_CLIP_REWARD = 10.0
VECNORMALIZE_EPSILON = 1e-8


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
    norm_obs: bool = True,
    clip_obs: float = VECNORMALIZE_CLIP_OBS,
    clip_reward: float = VECNORMALIZE_CLIP_REWARD,
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
    :param norm_obs: normalise observations (``False``: they pass through; for policies that
        scale their inputs themselves, such as the replica-set policies).
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
    vec_normalize = VecNormalize(venv, training=True, norm_obs=norm_obs, norm_reward=norm_reward,
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




# ---------------------------------------------------------------------------- normalisation
class ObsNormalizer:
    """``VecNormalize``'s observation transform with frozen statistics.

    ``normalize(obs) = clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)`` in
    float64, cast to float32: the expression of ``VecNormalize._normalize_obs`` followed by the
    cast in ``VecNormalize.normalize_obs`` (stable_baselines3 2.9). That helper is an instance
    method of the wrapper, so it is restated here rather than called.

    :param obs_rms: per-feature mean and variance of the raw observations.
    :param clip_obs: bound on the absolute value of a normalised feature (VecNormalize's
        ``clip_obs``).
    :param epsilon: added to the variance before the square root (VecNormalize's ``epsilon``).
    """

    def __init__(self, obs_rms: RunningMeanStd, clip_obs: float = VECNORMALIZE_CLIP_OBS,
                 epsilon: float = VECNORMALIZE_EPSILON) -> None:
        checked_moments(obs_rms)
        if not clip_obs > 0:
            raise ValueError(f"clip_obs={clip_obs!r}: must be > 0")
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon!r}: must be > 0")
        self.obs_rms = obs_rms
        self.clip_obs = float(clip_obs)
        self.epsilon = float(epsilon)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.shape(self.obs_rms.mean))

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """Normalise raw observations (any leading batch dimensions); returns float32."""
        rms = self.obs_rms
        return np.clip((obs - rms.mean) / np.sqrt(rms.var + self.epsilon),
                       -self.clip_obs, self.clip_obs).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able statistics (float64 values survive a JSON round trip exactly)."""
        return {
            "mean": np.asarray(self.obs_rms.mean, dtype=np.float64).tolist(),
            "var": np.asarray(self.obs_rms.var, dtype=np.float64).tolist(),
            "count": float(self.obs_rms.count),
            "clip_obs": self.clip_obs,
            "epsilon": self.epsilon,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObsNormalizer:
        """Inverse of :meth:`to_dict`; ``ValueError`` names a missing or malformed key."""
        return cls(_rms_from_dict(data, "obs normalisation"), float(data["clip_obs"]),
                   float(data["epsilon"]))

    @classmethod
    def from_vec_normalize(cls, vec_normalize) -> ObsNormalizer:
        """The statistics and settings of a ``VecNormalize`` wrapper (copied)."""
        return cls(vec_normalize.obs_rms.copy(), vec_normalize.clip_obs, vec_normalize.epsilon)

    def apply_to(self, vec_normalize) -> None:
        """Load these statistics into ``vec_normalize.obs_rms`` (a copy).

        ``ValueError`` if the wrapper's ``clip_obs``/``epsilon`` differ (the policy would see
        different inputs) or the shapes do not match.
        """
        problems = []
        if float(vec_normalize.clip_obs) != self.clip_obs:
            problems.append(f"clip_obs: statistics {self.clip_obs}, VecNormalize "
                            f"{vec_normalize.clip_obs}")
        if float(vec_normalize.epsilon) != self.epsilon:
            problems.append(f"epsilon: statistics {self.epsilon}, VecNormalize "
                            f"{vec_normalize.epsilon}")
        target_shape = tuple(np.shape(vec_normalize.obs_rms.mean))
        if target_shape != self.shape:
            problems.append(f"shape: statistics {self.shape}, VecNormalize {target_shape}")
        if problems:
            raise ValueError("cannot load observation statistics: " + "; ".join(problems))
        vec_normalize.obs_rms = self.obs_rms.copy()

    def __repr__(self) -> str:
        return (f"ObsNormalizer(shape={self.shape}, count={float(self.obs_rms.count):g}, "
                f"clip_obs={self.clip_obs}, epsilon={self.epsilon})")


class ReturnNormalizer:
    """``VecNormalize(norm_reward=True)``'s reward transform with frozen statistics.

    ``r -> clip(r / sqrt(ret_var + epsilon), -clip_reward, clip_reward)`` where ``ret_var`` is
    the variance of the running discounted return (VecNormalize's ``ret_rms``; no mean is
    subtracted). Value pretraining on these rewards fits the critic in the units PPO's value
    loss will use under ``norm_reward=True``.

    :param ret_rms: statistics of the running discounted return (only ``var`` is used).
    :param gamma: discount factor of the running return (VecNormalize's ``gamma``).
    :param clip_reward: bound on a normalised reward.
    :param epsilon: added to the variance before the square root.
    """

    def __init__(self, ret_rms: RunningMeanStd, gamma: float,
                 clip_reward: float = VECNORMALIZE_CLIP_REWARD,
                 epsilon: float = VECNORMALIZE_EPSILON) -> None:
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma={gamma!r}: must be in [0, 1]")
        if not clip_reward > 0:
            raise ValueError(f"clip_reward={clip_reward!r}: must be > 0")
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon!r}: must be > 0")
        self.ret_rms = ret_rms
        self.gamma = float(gamma)
        self.clip_reward = float(clip_reward)
        self.epsilon = float(epsilon)

    def __call__(self, rewards: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(rewards, np.float64) / np.sqrt(self.ret_rms.var + self.epsilon),
                       -self.clip_reward, self.clip_reward)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": float(self.ret_rms.mean), "var": float(self.ret_rms.var),
            "count": float(self.ret_rms.count), "gamma": self.gamma,
            "clip_reward": self.clip_reward, "epsilon": self.epsilon,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReturnNormalizer:
        return cls(_rms_from_dict(data, "return normalisation"), float(data["gamma"]),
                   float(data["clip_reward"]), float(data["epsilon"]))

    def __repr__(self) -> str:
        return (f"ReturnNormalizer(std={math.sqrt(float(self.ret_rms.var)):.4g}, "
                f"gamma={self.gamma}, clip_reward={self.clip_reward})")


def vec_normalize_to_json(vec_normalize: VecNormalize) -> dict[str, Any]:
    """A ``VecNormalize``'s settings and statistics as JSON-able values (float64 survives the
    round trip exactly), readable without this project (``final_vecnormalize.pkl`` pickles
    :class:`FrozenRunningMeanStd`): ``norm_obs``, ``norm_reward``, ``clip_obs``,
    ``clip_reward``, ``epsilon``, ``gamma``, ``obs_rms`` and ``ret_rms`` (``mean``, ``var``,
    ``count``). An observation is normalised as ``clip((obs - obs_rms.mean) /
    sqrt(obs_rms.var + epsilon), -clip_obs, clip_obs)`` when ``norm_obs``."""
    def stats(rms: RunningMeanStd) -> dict[str, Any]:
        return {"mean": np.asarray(rms.mean, dtype=np.float64).tolist(),
                "var": np.asarray(rms.var, dtype=np.float64).tolist(),
                "count": float(rms.count)}

    obs_rms = vec_normalize.obs_rms
    return {
        "format": "vecnormalize/json", "format_version": 1,
        "norm_obs": bool(vec_normalize.norm_obs), "norm_reward": bool(vec_normalize.norm_reward),
        "clip_obs": float(vec_normalize.clip_obs), "clip_reward": float(vec_normalize.clip_reward),
        "epsilon": float(vec_normalize.epsilon), "gamma": float(vec_normalize.gamma),
        "obs_rms": ({k: stats(v) for k, v in obs_rms.items()} if isinstance(obs_rms, dict)
                    else stats(obs_rms)),
        "ret_rms": stats(vec_normalize.ret_rms),
    }


def _rms_from_dict(data: Mapping[str, Any], what: str) -> RunningMeanStd:
    try:
        mean = np.asarray(data["mean"], dtype=np.float64)
        var = np.asarray(data["var"], dtype=np.float64)
        count = float(data["count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{what}: malformed statistics ({exc!r})") from None
    rms = RunningMeanStd(shape=mean.shape)
    rms.mean, rms.var, rms.count = mean, var, count
    return rms


def acting_observations(trajectory: Trajectory) -> np.ndarray:
    """The observations actions were taken on: the first ``len(acts)`` rows."""
    return np.asarray(trajectory.obs)[: len(trajectory.acts)]


def fit_obs_normalizer(trajectories: Sequence[Trajectory],
                       clip_obs: float = VECNORMALIZE_CLIP_OBS,
                       epsilon: float = VECNORMALIZE_EPSILON) -> RunningMeanStd:
    """Mean and variance of every observation an action was taken on (count = their number).

    Load the result into ``VecNormalize.obs_rms`` (or wrap it in :class:`ObsNormalizer`) so PPO
    starts from the statistics BC trained on. ``clip_obs``/``epsilon`` are only checked here.
    """
    if not trajectories:
        raise ValueError("trajectories: need at least one trajectory")
    obs = np.concatenate([acting_observations(t) for t in trajectories]).astype(np.float64)
    if obs.shape[0] == 0:
        raise ValueError("trajectories: all are empty (no actions)")
    rms = RunningMeanStd(shape=obs.shape[1:])
    rms.mean = obs.mean(axis=0)
    rms.var = obs.var(axis=0)
    rms.count = float(obs.shape[0])
    ObsNormalizer(rms, clip_obs, epsilon)  # validates
    return rms


def fit_return_normalizer(trajectories: Sequence[Trajectory], gamma: float,
                          clip_reward: float = VECNORMALIZE_CLIP_REWARD,
                          epsilon: float = VECNORMALIZE_EPSILON) -> ReturnNormalizer:
    """Statistics of the running discounted return ``R_t = gamma * R_{t-1} + r_t`` over the
    demonstrations (restarted at every trajectory), as ``VecNormalize`` accumulates them."""
    running = []
    for i, traj in enumerate(trajectories):
        rews = getattr(traj, "rews", None)
        if rews is None:
            raise ValueError(f"trajectories[{i}]: has no rews (need TrajectoryWithRew)")
        ret, out = 0.0, np.empty(len(rews))
        for t, r in enumerate(np.asarray(rews, np.float64)):
            ret = ret * gamma + r
            out[t] = ret
        running.append(out)
    values = np.concatenate(running) if running else np.zeros(0)
    if values.size == 0:
        raise ValueError("trajectories: no rewards to fit")
    rms = RunningMeanStd(shape=())
    rms.mean, rms.var, rms.count = float(values.mean()), float(values.var()), float(values.size)
    return ReturnNormalizer(rms, gamma, clip_reward, epsilon)
