"""The PPO stage of the main job: build the training session, resume it, train it.

* :func:`build_session` -- environments (:mod:`sb3_warmstart.pipeline.envs`), normaliser, the
  KL-regularised algorithm and the stateful callbacks, warm-started from a
  :class:`~sb3_warmstart.pipeline.warm_start_stage.Pretrained` policy or cold;
* :func:`resume_session` -- the same session rebuilt as a checkpoint describes it, then loaded;
* :class:`PPOTrainer` -- ``learn()`` to the budget (or chunk by chunk) with periodic
  checkpoints, resumable logs, progress lines and a graceful stop on Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import CallbackList

from llm_cluster_env.atomic import atomic_write_json
from sb3_warmstart.algorithms.callbacks import (
    CriticWarmup,
    HyperparameterLogger,
    NormalizerStabilization,
    TemperatureController,
    TrainingMonitor,
)
from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO
from sb3_warmstart.common.checkpoint import (
    CheckpointManager,
    PeriodicCheckpoint,
    TrainingSession,
    restore_pending_log_values,
)
from sb3_warmstart.common.normalize import vec_normalize_to_json
from sb3_warmstart.pipeline.config import TrainingConfig
from sb3_warmstart.pipeline.envs import make_training_venv, training_env_spec, training_layout
from sb3_warmstart.pipeline.logs import make_run_logger
from sb3_warmstart.pipeline.progress import PPOProgress
from sb3_warmstart.pipeline.warm_start_stage import Pretrained
from sb3_warmstart.policies.replica_set import policy_class_for

log = logging.getLogger("sb3_warmstart.pipeline.runner")


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (Ctrl-C) after saving a checkpoint."""

    def __init__(self, num_timesteps: int, checkpoint: Path) -> None:
        self.num_timesteps = num_timesteps
        self.checkpoint = checkpoint
        super().__init__(f"interrupted at {num_timesteps:,} env steps; saved {checkpoint}; run "
                         "the same command to continue")


def session_fingerprint(config: TrainingConfig, venv) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the run's training identity and the
    environment's observation schema and action count."""
    layout = training_layout(training_env_spec(config))
    return {"training": config.training_identity(), "schema": layout.schema(),
            "actions": int(venv.action_space.n)}


def make_model(config: TrainingConfig, venv, *, warm: bool):
    """The algorithm; without a warm start there is no reference, so no reference KL."""
    ppo, adv = config.ppo, config.advanced_optimization
    layout = training_layout(training_env_spec(config)) if ppo.replica_set else None
    if ppo.recurrent:
        cls, extra = KLRecurrentPPO, {"sequence_length": ppo.sequence_length}
    else:
        cls, extra = KLPPO, {}
    return cls(
        policy_class_for(ppo.replica_set, ppo.recurrent, ppo.recurrent_cell), venv, **extra,
        n_steps=ppo.n_steps, batch_size=ppo.batch_size, n_epochs=ppo.n_epochs,
        learning_rate=ppo.learning_rate, gamma=ppo.gamma, gae_lambda=ppo.gae_lambda,
        clip_range=ppo.clip_range, ent_coef=ppo.ent_coef, vf_coef=ppo.vf_coef,
        max_grad_norm=(ppo.max_grad_norm if adv.gradient_optimization.clip_by_global_norm
                       else float("inf")),
        target_kl=ppo.target_kl, policy_kwargs=ppo.policy_kwargs(layout), seed=config.seed,
        device="cpu", kl=config.kl if warm else config.kl.without_reference(),
        optimization=adv, schedule_total_timesteps=config.total_requests)


def build_session(config: TrainingConfig, pretrained: Pretrained | None, *,
                  resumed_extra: dict[str, Any] | None = None) -> TrainingSession:
    """Environments, normaliser, algorithm and stateful callbacks; weights and reference from
    ``pretrained`` when given. ``resumed_extra`` (a checkpoint manifest's ``extra``) rebuilds
    the session that checkpoint came from, before its state is loaded into it."""
    st = config.stabilization
    if resumed_extra is not None:
        warm = resumed_extra.get("warm_start") is not None
        update_obs = bool(resumed_extra.get("update_obs_stats", not warm))
        extra = dict(resumed_extra)
    else:
        warm = pretrained is not None
        update_obs = st.update_obs_stats if st.update_obs_stats is not None else not warm
        extra = {"warm_start": pretrained.source if pretrained else None,
                 "update_obs_stats": update_obs}
    ppo = config.ppo
    norm_obs = not ppo.replica_set  # the replica-set policies scale their inputs themselves
    venv = make_training_venv(training_env_spec(config), seed=config.seed, n_envs=ppo.n_envs,
                              gamma=ppo.gamma, norm_reward=ppo.norm_reward, norm_obs=norm_obs,
                              obs_rms=pretrained.obs_rms if pretrained and norm_obs else None,
                              freeze_obs=norm_obs and pretrained is not None and not update_obs,
                              paired_baseline=ppo.paired_baseline)
    # the clone's return statistics measure the raw reward: a paired reward (a difference of
    # two such rewards, far smaller) starts its own statistics in the stabilisation rollouts
    if (pretrained is not None and pretrained.return_normalizer is not None
            and ppo.paired_baseline is None):
        stats = pretrained.return_normalizer.ret_rms
        venv.ret_rms.mean, venv.ret_rms.var = np.array(stats.mean), np.array(stats.var)
        venv.ret_rms.count = float(stats.count)
    model = make_model(config, venv, warm=warm)
    if pretrained is not None:
        model.policy.load_state_dict(pretrained.policy.state_dict())
        model.set_reference_policy(pretrained.policy)
    stateful: dict[str, Any] = {"monitor": TrainingMonitor()}
    if config.temperature.enabled:
        stateful["temperature"] = TemperatureController(config.temperature)
    stateful["stabilization"] = NormalizerStabilization(st.stabilization_steps,
                                                        update_obs_stats=update_obs)
    if st.critic_warmup_steps > 0:
        stateful["critic_warmup"] = CriticWarmup(st.stabilization_steps, st.critic_warmup_steps)
    return TrainingSession(model=model, venv=venv, stateful=_stateful_only(stateful),
                           fingerprint=session_fingerprint(config, venv), extra=dict(extra),
                           callbacks=stateful)


def _stateful_only(objects: dict[str, Any]) -> dict[str, Any]:
    return {name: obj for name, obj in objects.items() if hasattr(obj, "state_dict")}


def resume_session(config: TrainingConfig, manager: CheckpointManager, checkpoint: Path
                   ) -> TrainingSession:
    """The session ``checkpoint`` was taken from, rebuilt and loaded.

    :raises sb3_warmstart.common.checkpoint.CheckpointError: corrupt, or of another run.
    """
    extra = manager.verify(checkpoint).get("extra", {})
    session = build_session(config, None, resumed_extra=extra)
    manager.load(checkpoint, session)
    return session


def recent_episode_note(monitor: TrainingMonitor, last: int = 8) -> str:
    """Mean E2E latency of the last ``last`` training episodes, for progress lines."""
    rows = monitor.history_rows("episode")[-last:]
    if not rows or "e2e_mean" not in rows[0]:
        return ""
    return f"recent training episodes: mean E2E {np.mean([r['e2e_mean'] for r in rows]):.2f} s"


class PPOTrainer:
    """Trains a session to the budget in a run folder.

    :param config: what to train. :param session: the (new or resumed) session.
    :param run_dir: the run folder (``progress.csv``, ``tensorboard/``, ``training_history.csv``,
        ``checkpoints/``). :param manager: the checkpoint manager.
    :param resumed: whether the session came from a checkpoint (logs continue from its step).
    :param progress: progress bar / lines.
    """

    def __init__(self, config: TrainingConfig, session: TrainingSession, run_dir: Path,
                 manager: CheckpointManager, *, resumed: bool, progress: bool = True) -> None:
        self.config = config
        self.session = session
        self.run_dir = Path(run_dir)
        self.manager = manager
        model = session.model
        model.set_logger(make_run_logger(self.run_dir,
                                         int(model.num_timesteps) if resumed else None))
        restore_pending_log_values(model.logger, session.pending_log_values)
        self.checkpoints = PeriodicCheckpoint(manager, session,
                                              config.checkpointing.checkpoint_interval,
                                              after_save=self._after_save)
        callbacks = [self.checkpoints, session.callbacks["stabilization"]]
        if "critic_warmup" in session.callbacks:
            callbacks.append(session.callbacks["critic_warmup"])
        if "temperature" in session.callbacks:
            callbacks.append(session.callbacks["temperature"])
        callbacks += [self.monitor, HyperparameterLogger({"seed": config.seed}),
                      PPOProgress(config.total_requests,
                                  note=lambda: recent_episode_note(self.monitor),
                                  enabled=progress)]
        self.callback = CallbackList(callbacks)

    @property
    def monitor(self) -> TrainingMonitor:
        """The session's training monitor (the history rows)."""
        return self.session.callbacks["monitor"]

    def _after_save(self, path: Path) -> None:
        """After each checkpoint: the training history as of that checkpoint (a resumed run
        rewrites it from the checkpointed rows, so it never loses or repeats a row)."""
        self.monitor.write_csv(self.run_dir / "training_history.csv")

    def learn(self, steps: int) -> None:
        """``learn()`` for ``steps`` more env steps; Ctrl-C saves a checkpoint at the next rollout
        boundary and raises :class:`TrainingInterrupted` (a second Ctrl-C stops at once)."""
        model = self.session.model
        with _stop_on_sigint(self.checkpoints.request_stop):
            model.learn(steps, callback=self.callback, reset_num_timesteps=False,
                        progress_bar=False)
        if self.checkpoints.stopped_at is not None:
            raise TrainingInterrupted(int(self.session.extra["last_checkpoint_step"]),
                                      self.checkpoints.stopped_at)

    def save_checkpoint(self) -> Path:
        return self.checkpoints.save()

    def finish(self) -> None:
        """The final model, normaliser and training history in the run folder."""
        model = self.session.model
        model.save(self.run_dir / "final_model.zip")
        self.session.venv.save(str(self.run_dir / "final_vecnormalize.pkl"))
        atomic_write_json(self.run_dir / "final_vecnormalize.json",
                          vec_normalize_to_json(self.session.venv))
        self.monitor.write_csv(self.run_dir / "training_history.csv")


class _stop_on_sigint:
    """While active, the first SIGINT calls ``request_stop`` (training stops cleanly at the next
    rollout boundary); the second raises ``KeyboardInterrupt``. Only in the main thread."""

    def __init__(self, request_stop: Callable[[], None]) -> None:
        self.request_stop = request_stop
        self.previous: Any = None
        self.active = threading.current_thread() is threading.main_thread()
        self.pressed_at: float | None = None

    def _handler(self, signum, frame) -> None:
        if self.pressed_at is not None:
            raise KeyboardInterrupt
        self.pressed_at = time.monotonic()
        self.request_stop()

    def __enter__(self) -> _stop_on_sigint:
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
