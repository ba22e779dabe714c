"""The warm-start pipeline: demos -> behaviour cloning (or an external checkpoint) -> PPO with KL
regularisation and temperature control -> evaluation and report.

``train/warmstart.py`` is its command line. A stage runs only when needed: demonstrations and the
clone are reused from the run folder when their settings match (``--force-warmstart`` redoes
them); resuming a PPO run skips both (the reference policy lives in the checkpoint).

Run folder::

    config.yaml              resolved configuration (loadable with --config)
    command.txt              the command line, one line per invocation
    ppo_training.log         pipeline log and SB3's training tables
    tensorboard/             TensorBoard events (train/, rollout/, episode/, temperature/ ...)
    progress.csv             SB3's CSV log;  training_history.csv  the monitor's rows
    demos/                   imitation trajectories + stats.json
    pretrained/              bc_policy.zip (clone) or external.zip (copied, validated)
    checkpoints/             step_<n>/ directories and latest.json
    training_progress.json   the chunks completed (chunk mode) and the run status
    final_model.zip, final_vecnormalize.pkl
    report/                  results table (txt/csv/json), report.md, PNG plots
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.logger import (
    CSVOutputFormat,
    HumanOutputFormat,
    Logger,
    TensorBoardOutputFormat,
)
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

import llm_cluster_env
from llm_cluster_env.atomic import atomic_write_json
from sb3_warmstart.bc import PRESETS, ReturnNormalizer
from sb3_warmstart.callbacks import NormalizerStabilization, TemperatureController, TrainingMonitor
from sb3_warmstart.checkpoint import (
    CheckpointCallback,
    CheckpointError,
    CheckpointManager,
    TrainingSession,
)
from sb3_warmstart.config import TrainingConfig, dump_config
from sb3_warmstart.normalize import make_vec_normalize
from sb3_warmstart.ppo import KLPPO, KLRecurrentPPO
from sb3_warmstart.schedules import LRScheduleConfig

log = logging.getLogger("sb3_warmstart.pipeline")

ResumeChoice = Literal["ask", "checkpoint", "warmstart", "external"]
PROGRESS_FILE = "training_progress.json"


class PipelineError(RuntimeError):
    """The run cannot proceed (a refused resume prompt, a checkpoint that does not fit with
    ``--strict-resume``, an invalid external checkpoint...)."""


@dataclass
class RunOptions:
    """How to run (from the command line), as opposed to what to train (the config).

    :param output_dir: the run folder.
    :param resume: what to do when a checkpoint exists (see :meth:`WarmStartPipeline.decide`).
    :param strict_resume: fail instead of starting fresh when a checkpoint does not fit.
    :param force_warmstart: collect demos and clone again even if the run folder has them.
    :param chunk_mode: train in chunks of ``chunk_size`` env steps, checkpointing after each.
    :param chunk_size: env steps per chunk.
    :param max_chunks: stop this invocation after this many chunks (the next invocation of the
        same command continues); ``None`` = run to the budget.
    :param progress: progress bars.
    :param command: the command line, recorded in the run folder.
    :param prompt: asks the operator a question (``input`` by default; tests inject).
    :param interactive: whether a terminal is attached (``sys.stdin.isatty`` by default).
    """

    output_dir: Path
    resume: ResumeChoice = "ask"
    strict_resume: bool = False
    force_warmstart: bool = False
    chunk_mode: bool = False
    chunk_size: int | None = None
    max_chunks: int | None = None
    progress: bool = True
    command: list[str] = field(default_factory=list)
    prompt: Callable[[str], str] = input
    interactive: Callable[[], bool] = field(default=lambda: sys.stdin.isatty())


@dataclass
class Pretrained:
    """The warm-start policy PPO starts from (and regularises towards)."""

    policy: Any  # an SB3 ActorCriticPolicy
    obs_rms: Any  # RunningMeanStd
    return_normalizer: ReturnNormalizer | None
    source: str
    summary: dict[str, Any]


def recent_episode_summary(monitor: TrainingMonitor, last: int = 8) -> dict[str, float]:
    """Mean latency metrics of the last ``last`` training episodes (empty before any)."""
    rows = monitor.history_rows("episode")[-last:]
    keys = ("e2e_mean", "e2e_p99", "ttft_mean", "balance")
    return {k: float(np.mean([r[k] for r in rows])) for k in keys if rows and k in rows[0]}


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


class WarmStartPipeline:
    """Runs one training job in ``options.output_dir``.

    :param config: what to train. :param options: how to run it.
    """

    def __init__(self, config: TrainingConfig, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.run_dir = Path(options.output_dir)
        self.timings: dict[str, float] = {}
        self.session: TrainingSession | None = None
        self.monitor: TrainingMonitor | None = None
        self.temperature: TemperatureController | None = None
        self.stabilization: NormalizerStabilization | None = None
        self.pretrained: Pretrained | None = None
        self.finished = False

    # ================================================================ setup
    def prepare(self) -> None:
        """Create the run folder, record config and command, start the log."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.run_dir / "config.yaml"
        if config_path.is_file():  # an earlier invocation: keep its config if this one differs
            from sb3_warmstart.config import load_config

            try:
                earlier = load_config(config_path)
            except Exception:  # unreadable or from another version: keep it all the same
                earlier = None
            if earlier != self.config:
                config_path.rename(self.run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        dump_config(self.config, config_path)
        with open(self.run_dir / "command.txt", "a") as f:
            f.write(" ".join(self.options.command) + "\n")
        handler = logging.FileHandler(self.run_dir / "ppo_training.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger("sb3_warmstart")
        root.setLevel(logging.INFO)
        root.propagate = False  # libraries configure the root logger; print each line once
        for old in [h for h in root.handlers if getattr(h, "_warmstart_run", False)]:
            root.removeHandler(old)
            old.close()
        handler._warmstart_run = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in root.handlers):
            console = logging.StreamHandler()
            console.setFormatter(logging.Formatter("[warmstart] %(message)s"))
            root.addHandler(console)
        th.set_num_threads(1)
        try:  # HuggingFace datasets (imitation's demo format) prints a bar per save
            from datasets.utils.logging import disable_progress_bar

            disable_progress_bar()
        except ImportError:
            pass
        log.info("run folder %s; command: %s", self.run_dir, " ".join(self.options.command))

    def env_fingerprint(self) -> dict[str, Any]:
        env = gym.make(llm_cluster_env.ENV_ID, **self.config.env_kwargs)
        ppo = self.config.ppo
        return {
            "schema": env.unwrapped.layout.schema(),
            "actions": int(env.action_space.n),
            "algorithm": ppo.algorithm,
            "net_arch": list(ppo.net_arch),
            "lstm": [ppo.lstm_hidden_size, ppo.n_lstm_layers] if ppo.recurrent else None,
            "n_envs": ppo.n_envs,
            "env_kwargs": self.config.env_kwargs,
        }

    # ================================================================ decisions
    def decide(self, checkpoint: Path | None) -> str:
        """``resume``, ``warmstart``, ``external`` or ``cold``.

        * Chunk mode with recorded progress: resume, never ask (restarting the same command
          after a crash continues with the next chunk).
        * A checkpoint and an external model: ``--resume ask`` asks on a terminal (resume the
          checkpoint / warm start again / use the external model) and refuses without one;
          ``checkpoint``, ``warmstart``, ``external`` decide without asking.
        * Only a checkpoint: resume it unless ``--resume warmstart|external`` or
          ``--force-warmstart``.
        """
        ws = self.config.warm_start
        external = ws.external_pretrain
        fresh = "cold" if not ws.enabled else ("external" if external else "warmstart")
        if checkpoint is None:
            if self.options.resume == "checkpoint":
                log.warning("--resume checkpoint: no usable checkpoint in %s; starting fresh",
                            self.run_dir / "checkpoints")
            return fresh
        if self.options.chunk_mode and (self.run_dir / PROGRESS_FILE).is_file():
            return "resume"
        choice = self.options.resume
        if self.options.force_warmstart and choice == "ask":
            choice = "warmstart"
        if choice == "ask":
            if not external:
                return "resume"
            if not self.options.interactive():
                raise PipelineError(
                    f"both a checkpoint ({checkpoint}) and an external model ({external}) exist "
                    "and --resume ask needs a terminal to ask which to use: pass --resume "
                    "checkpoint, --resume warmstart or --resume external")
            answer = self.options.prompt(
                f"A checkpoint ({checkpoint.name}) and an external model ({external}) exist.\n"
                "  [1] resume the checkpoint\n  [2] warm start again (demos + BC)\n"
                "  [3] start from the external model\nchoice [1/2/3]: ").strip()
            choice = {"1": "checkpoint", "2": "warmstart", "3": "external"}.get(answer)
            if choice is None:
                raise PipelineError(f"resume prompt: answer {answer!r} is not 1, 2 or 3")
        if choice == "checkpoint":
            return "resume"
        if choice == "external" and not external:
            raise PipelineError("--resume external: no external model (--external-pretrain)")
        if choice == "warmstart" and not ws.enabled:
            return "cold"
        return choice

    def archive_checkpoints(self) -> None:
        """Keep earlier checkpoints out of a fresh run's way without deleting them."""
        folder = self.run_dir / "checkpoints"
        if folder.is_dir() and any(folder.iterdir()):
            target = self.run_dir / f"checkpoints.previous-{time.strftime('%Y%m%d-%H%M%S')}"
            folder.rename(target)
            log.info("moved the earlier checkpoints to %s", target)
        progress = self.run_dir / PROGRESS_FILE
        if progress.is_file():
            progress.rename(self.run_dir / f"{PROGRESS_FILE}.previous")

    # ================================================================ warm start
    def collect_demos(self):
        """Demonstrations for BC, reused from the run folder when their settings match."""
        from sb3_warmstart.demos import (
            collect_demonstrations,
            load_demonstrations,
            save_demonstrations,
        )

        ws = self.config.warm_start
        path = self.run_dir / "demos"
        env_kwargs = dict(self.config.env_kwargs, episode_requests=ws.demo_episode_requests)
        settings = {"env_kwargs": env_kwargs, "policies": ws.demo_policies,
                    "steps": ws.demo_steps, "imbalance": ws.imbalance, "seed": self.config.seed}
        if path.is_dir() and not self.options.force_warmstart:
            try:
                trajectories, stats = load_demonstrations(path)
                if stats.get("pipeline_settings") == _fingerprint(settings):
                    log.info("demos: reusing %s (%d trajectories)", path, len(trajectories))
                    return trajectories, stats
                log.info("demos: %s has other settings; collecting again", path)
            except Exception as err:  # a damaged earlier set is replaced, atomically
                log.warning("demos: %s unusable (%s); collecting again", path, err)
        start = time.perf_counter()
        trajectories, stats = collect_demonstrations(
            env_kwargs=env_kwargs, policies=ws.demo_policies, total_steps=ws.demo_steps,
            seed=self.config.seed, imbalance=ws.imbalance, progress=self.options.progress)
        stats["pipeline_settings"] = _fingerprint(settings)
        save_demonstrations(path, trajectories, stats)
        self.timings["demos_s"] = time.perf_counter() - start
        log.info("demos: %d steps in %d trajectories (%.1f s)",
                 sum(len(t.acts) for t in trajectories), len(trajectories),
                 self.timings["demos_s"])
        return trajectories, stats

    def _bc_overrides(self) -> dict[str, Any]:
        ws = self.config.warm_start
        return {"epochs": ws.bc_epochs, "batch_size": ws.bc_batch_size,
                "learning_rate": ws.bc_learning_rate, "sequence_length": ws.bc_sequence_length}

    def _bc_preset(self):
        from dataclasses import replace

        ppo, ws = self.config.ppo, self.config.warm_start
        preset = replace(PRESETS[ws.bc_mode], net_arch=tuple(ppo.net_arch),
                         lstm_hidden_size=ppo.lstm_hidden_size, n_lstm_layers=ppo.n_lstm_layers)
        if ws.bc_lr_schedule is not None and ws.bc_lr_schedule != preset.lr_schedule:
            preset = replace(preset, lr_schedule=ws.bc_lr_schedule,
                             min_learning_rate=preset.min_learning_rate or 1e-5)
        return preset

    def expected_architecture(self) -> dict[str, Any]:
        """The policy architecture PPO will build (an external checkpoint must match it)."""
        ppo = self.config.ppo
        arch: dict[str, Any] = {"policy_class": "MlpLstmPolicy" if ppo.recurrent else "MlpPolicy",
                                "net_arch": list(ppo.net_arch)}
        if ppo.recurrent:
            arch.update(lstm_hidden_size=ppo.lstm_hidden_size, n_lstm_layers=ppo.n_lstm_layers)
        return arch

    def validate_external(self) -> None:
        """Check ``--external-pretrain`` against the env and the architecture before anything
        in the run folder is touched."""
        from sb3_warmstart.policy_io import CheckpointError as PretrainedError
        from sb3_warmstart.policy_io import validate_pretrained

        source = self.config.warm_start.external_pretrain
        env = gym.make(llm_cluster_env.ENV_ID, **self.config.env_kwargs)
        try:
            validate_pretrained(source, env, expected_arch=self.expected_architecture())
        except PretrainedError as err:
            raise PipelineError(f"--external-pretrain={source!r}: {err}") from None

    def behaviour_clone(self, mode: str) -> Pretrained:
        """The warm-start policy: cloned from demos, the external model (validated, copied into
        the run folder, optionally fine-tuned), reused from an earlier identical clone."""
        from sb3_warmstart.cloning import clone_demonstrations
        from sb3_warmstart.policy_io import (
            CheckpointError as PretrainedError,
        )
        from sb3_warmstart.policy_io import load_pretrained, read_metadata, save_pretrained

        ws, ppo = self.config.warm_start, self.config.ppo
        folder = self.run_dir / "pretrained"
        folder.mkdir(exist_ok=True)
        env = gym.make(llm_cluster_env.ENV_ID, **self.config.env_kwargs)
        expected = self.expected_architecture()
        init_model = init_obs_rms = None
        if mode == "external":
            source = Path(ws.external_pretrain)
            copy = folder / "external.zip"
            shutil.copyfile(source, copy.with_suffix(".zip.tmp"))
            copy.with_suffix(".zip.tmp").replace(copy)
            log.info("external checkpoint %s validated and copied to %s", source, copy)
            model, meta, obs_rms = load_pretrained(copy)
            if ws.skip_bc_training:
                returns = (ReturnNormalizer.from_dict(meta["return_normalization"])
                           if meta.get("return_normalization") else None)
                return Pretrained(model.policy, obs_rms, returns, str(source),
                                  {"fine_tuned": False, **meta.get("bc_metrics", {}).get("final",
                                                                                         {})})
            init_model, init_obs_rms = model, obs_rms
        trajectories, stats = self.collect_demos()
        target = folder / "bc_policy.zip"
        settings = {"demos": stats.get("pipeline_settings"), "bc": self._bc_overrides(),
                    "mode": ws.bc_mode, "schedule": ws.bc_lr_schedule, "arch": expected,
                    "seed": self.config.seed,
                    "external": str(ws.external_pretrain) if init_model else None,
                    "gamma": ppo.gamma, "value": ws.value_pretraining}
        if target.is_file() and not self.options.force_warmstart:
            try:
                meta = read_metadata(target)
                if meta.get("pipeline_settings") == _fingerprint(settings):
                    model, meta, obs_rms = load_pretrained(target)
                    returns = (ReturnNormalizer.from_dict(meta["return_normalization"])
                               if meta.get("return_normalization") else None)
                    log.info("BC: reusing %s", target)
                    return Pretrained(model.policy, obs_rms, returns, str(target),
                                      meta["bc_metrics"]["final"])
            except PretrainedError as err:
                log.warning("BC: %s unusable (%s); cloning again", target, err)
        start = time.perf_counter()
        experts = list(ws.demo_policies)
        clone = clone_demonstrations(
            trajectories, env=env, preset=self._bc_preset(), recurrent=ppo.recurrent,
            seed=self.config.seed, gamma=ppo.gamma, overrides=self._bc_overrides(),
            validation_fraction=ws.validation_fraction, value_pretraining=ws.value_pretraining,
            norm_reward=ppo.norm_reward, expert=experts[0] if len(experts) == 1 else None,
            init_model=init_model, init_obs_rms=init_obs_rms, progress=self.options.progress)
        self.timings["bc_s"] = time.perf_counter() - start
        metadata = clone.metadata(pipeline_settings=_fingerprint(settings),
                                  env_kwargs=self.config.env_kwargs,
                                  demos={"path": str(self.run_dir / "demos"),
                                         "policies": ws.demo_policies, "steps": ws.demo_steps},
                                  command=self.options.command)
        save_pretrained(target, clone.model.policy, metadata, clone.obs_rms,
                        observation_schema=env.unwrapped.layout.schema(),
                        return_normalizer=clone.return_normalizer)
        s = clone.summary
        log.info("BC (%s): val accuracy %.4f, tie-aware %.4f, predicted share %s vs expert %s "
                 "(%.1f s)", "fine-tuned external" if init_model else "from scratch",
                 s["val_accuracy"], s["val_tie_accuracy"],
                 np.round(s["predicted_share"], 3).tolist() if s["predicted_share"] else None,
                 np.round(s["expert_share"], 3).tolist() if s["expert_share"] else None,
                 self.timings["bc_s"])
        return Pretrained(clone.model.policy, clone.obs_rms, clone.return_normalizer,
                          str(target), s)

    # ================================================================ PPO
    def make_venv(self, obs_rms=None, freeze_obs: bool = False):
        cfg, ppo = self.config, self.config.ppo

        def make(rank: int):
            def thunk():
                env = Monitor(gym.make(llm_cluster_env.ENV_ID, **cfg.env_kwargs))
                env.reset(seed=cfg.seed * 1000 + rank)
                return env
            return thunk

        venv = DummyVecEnv([make(i) for i in range(ppo.n_envs)])
        venv.seed(cfg.seed * 1000)
        return make_vec_normalize(venv, gamma=ppo.gamma, obs_rms=obs_rms, freeze_obs=freeze_obs,
                                  norm_reward=ppo.norm_reward)

    def make_model(self, venv, warm: bool = True):
        """The algorithm; without a warm start there is no reference, so no reference KL."""
        cfg, ppo, kl = self.config, self.config.ppo, self.config.kl
        adv = cfg.advanced_optimization
        lr_cfg = adv.learning_rate_schedule
        batch = adv.adaptive_batch_size
        policy_kwargs: dict[str, Any] = {"net_arch": {"pi": list(ppo.net_arch),
                                                      "vf": list(ppo.net_arch)}}
        if ppo.recurrent:
            policy_kwargs.update(lstm_hidden_size=ppo.lstm_hidden_size,
                                 n_lstm_layers=ppo.n_lstm_layers)
        cls = KLRecurrentPPO if ppo.recurrent else KLPPO
        return cls(
            "TemperatureMlpLstmPolicy" if ppo.recurrent else "TemperatureMlpPolicy", venv,
            n_steps=ppo.n_steps, batch_size=ppo.batch_size, n_epochs=ppo.n_epochs,
            learning_rate=ppo.learning_rate, gamma=ppo.gamma, gae_lambda=ppo.gae_lambda,
            clip_range=ppo.clip_range, ent_coef=ppo.ent_coef, vf_coef=ppo.vf_coef,
            max_grad_norm=(ppo.max_grad_norm if adv.gradient_optimization.clip_by_global_norm
                           else float("inf")),
            target_kl=ppo.target_kl, policy_kwargs=policy_kwargs, seed=cfg.seed, device="cpu",
            kl_ref_coef_initial=kl.kl_ref_coef_initial if warm else 0.0,
            kl_ref_coef_final=kl.kl_ref_coef_final if warm else 0.0,
            kl_ref_decay_steps=kl.kl_ref_decay_steps, kl_coef=kl.kl_coef,
            target_kl_early_stop=kl.target_kl_early_stop,
            entropy_warmup_coef=kl.entropy_warmup_coef, warmup_steps=kl.warmup_steps,
            entropy_min=kl.entropy_min, entropy_floor_coef=kl.entropy_floor_coef,
            lr_schedule_config=(LRScheduleConfig(
                warmup_steps=lr_cfg.warmup_steps, restart_period=lr_cfg.restart_period,
                min_lr_ratio=lr_cfg.min_lr_ratio, period_multiplier=lr_cfg.period_multiplier)
                if lr_cfg.type == "cosine_annealing_with_warmup" else None),
            gradient_accumulation_steps=adv.gradient_optimization.accumulation_steps,
            min_batch_size=batch.min_batch_size if batch.enable else None,
            max_batch_size=batch.max_batch_size if batch.enable else None,
            batch_size_adaptation_rate=batch.adaptation_rate,
            schedule_total_timesteps=cfg.total_requests,
        )

    def make_logger(self) -> Logger:
        formats = [HumanOutputFormat(open(self.run_dir / "ppo_training.log", "a")),
                   CSVOutputFormat(str(self.run_dir / "progress.csv")),
                   TensorBoardOutputFormat(str(self.run_dir / "tensorboard"))]
        return Logger(str(self.run_dir), formats)

    def build_session(self, pretrained: Pretrained | None,
                      resumed_extra: dict[str, Any] | None = None) -> TrainingSession:
        """Environments, normaliser, algorithm and callbacks; weights and reference from the
        warm-start policy when given. ``resumed_extra`` (a checkpoint's manifest extras) rebuilds
        the session a checkpoint came from, before its state is loaded into it."""
        st = self.config.stabilization
        if resumed_extra is not None:
            warm = resumed_extra.get("warm_start") is not None
            update_obs = bool(resumed_extra.get("update_obs_stats", not warm))
        else:
            warm = pretrained is not None
            update_obs = st.update_obs_stats if st.update_obs_stats is not None else not warm
        venv = self.make_venv(obs_rms=pretrained.obs_rms if pretrained else None,
                              freeze_obs=pretrained is not None and not update_obs)
        if pretrained is not None and pretrained.return_normalizer is not None:
            stats = pretrained.return_normalizer.ret_rms
            venv.ret_rms.mean, venv.ret_rms.var = np.array(stats.mean), np.array(stats.var)
            venv.ret_rms.count = float(stats.count)
        model = self.make_model(venv, warm=warm)
        if pretrained is not None:
            model.policy.load_state_dict(pretrained.policy.state_dict())
            model.set_reference_policy(pretrained.policy)
        model.set_logger(self.make_logger())
        self.monitor = TrainingMonitor()
        stateful: dict[str, Any] = {"monitor": self.monitor}
        if self.config.temperature.enabled:
            self.temperature = TemperatureController(**self.config.temperature.controller_kwargs())
            stateful["temperature"] = self.temperature
        self.stabilization = NormalizerStabilization(st.stabilization_steps,
                                                     update_obs_stats=update_obs)
        extra = {"warm_start": pretrained.source if pretrained else None,
                 "update_obs_stats": update_obs}
        if resumed_extra is not None:
            extra = dict(resumed_extra)
        return TrainingSession(model=model, venv=venv, stateful=stateful,
                               fingerprint=self.env_fingerprint(), extra=extra)

    def callbacks(self, manager: CheckpointManager) -> CallbackList:
        session = self.session
        cbs = [CheckpointCallback(manager, session, self.config.checkpointing.checkpoint_interval),
               self.stabilization]
        if self.temperature is not None:
            cbs.append(self.temperature)
        cbs.append(self.monitor)
        return CallbackList(cbs)

    # ================================================================ progress file
    def progress_path(self) -> Path:
        return self.run_dir / PROGRESS_FILE

    def read_progress(self) -> dict[str, Any]:
        path = self.progress_path()
        config = _fingerprint(self.config.to_dict())
        if path.is_file():
            try:
                progress = json.loads(path.read_text())
            except ValueError:
                log.warning("%s is unreadable; starting a new one", path)
            else:
                if progress.get("config") != config:
                    log.warning("the configuration changed since the chunks in %s were "
                                "recorded; continuing with the new one", path)
                    progress["config"] = config
                return progress
        return {"format": 1, "config": config, "chunks": [],
                "total_requests": self.config.total_requests, "status": "running"}

    def write_progress(self, progress: dict[str, Any]) -> None:
        atomic_write_json(self.progress_path(), progress)

    # ================================================================ run
    def train(self) -> TrainingSession:
        """Decide how to start, warm start if needed, then PPO to the budget."""
        manager = CheckpointManager(self.run_dir / "checkpoints",
                                    self.config.checkpointing.max_checkpoints)
        checkpoint, problems = manager.find_resumable()
        for problem in problems:
            log.warning("checkpoint skipped: %s", problem)
        decision = self.decide(checkpoint)
        log.info("start: %s%s", decision, f" from {checkpoint}" if decision == "resume" else "")
        if decision == "resume":
            try:
                extra = manager.verify(checkpoint).get("extra", {})
                session = self.build_session(None, resumed_extra=extra)
                manager.load(checkpoint, session)
                log.info("[Resume] continuing from %s at %d steps", checkpoint,
                         session.model.num_timesteps)
            except CheckpointError as err:
                if self.options.strict_resume:
                    raise PipelineError(f"--strict-resume: {err}") from None
                log.warning("%s; continuing with a fresh training state", err)
                self.archive_checkpoints()
                manager = CheckpointManager(self.run_dir / "checkpoints",
                                            self.config.checkpointing.max_checkpoints)
                decision = self.decide(None)
        if decision != "resume":
            if checkpoint is not None:
                self.archive_checkpoints()
                manager = CheckpointManager(self.run_dir / "checkpoints",
                                            self.config.checkpointing.max_checkpoints)
            self.pretrained = None if decision == "cold" else self.behaviour_clone(decision)
            session = self.build_session(self.pretrained)
        self.session = session
        self.finished = self.run_ppo(manager)
        return session

    def run_ppo(self, manager: CheckpointManager) -> bool:
        """Train to the budget (or ``max_chunks``); True when the budget is reached."""
        session, model = self.session, self.session.model
        total = self.config.total_requests
        callback = self.callbacks(manager)
        progress = self.read_progress()
        start = time.perf_counter()
        if self.options.chunk_mode:
            size = self.options.chunk_size or total
            done = [c["index"] for c in progress["chunks"]]
            if done:
                log.info("chunks already completed: %s", done)
            ran = 0
            while model.num_timesteps < total:
                if self.options.max_chunks is not None and ran >= self.options.max_chunks:
                    log.info("stopping after %d chunk(s) (--max-chunks); run the same command "
                             "again to continue", ran)
                    self.timings["ppo_s"] = time.perf_counter() - start
                    return False
                index = model.num_timesteps // size
                chunk_end = min((index + 1) * size, total)
                t0 = time.perf_counter()
                log.info("chunk %d: steps %d -> %d of %d", index, model.num_timesteps, chunk_end,
                         total)
                model.learn(chunk_end - model.num_timesteps, callback=callback,
                            reset_num_timesteps=False, progress_bar=self.options.progress)
                path = callback.callbacks[0].save()
                progress["chunks"].append({
                    "index": index, "end_timesteps": int(model.num_timesteps),
                    "checkpoint": path.name, "wall_s": round(time.perf_counter() - t0, 2),
                    "episode": recent_episode_summary(self.monitor),
                    "completed": time.strftime("%Y-%m-%dT%H:%M:%S")})
                progress["chunk_size"] = size
                self.write_progress(progress)
                ran += 1
        elif model.num_timesteps < total:
            model.learn(total - model.num_timesteps, callback=callback,
                        reset_num_timesteps=model.num_timesteps == 0,
                        progress_bar=self.options.progress)
            callback.callbacks[0].save()
        self.timings["ppo_s"] = time.perf_counter() - start
        progress["status"] = "finished"
        progress["num_timesteps"] = int(model.num_timesteps)
        self.write_progress(progress)
        model.save(self.run_dir / "final_model.zip")
        session.venv.save(str(self.run_dir / "final_vecnormalize.pkl"))
        self.monitor.write_csv(self.run_dir / "training_history.csv")
        log.info("PPO finished at %d steps (%.1f s this invocation)", model.num_timesteps,
                 self.timings["ppo_s"])
        return True

    def run(self) -> dict[str, Any]:
        """The whole job; returns the report summary."""
        from sb3_warmstart.report import build_report

        if self.config.warm_start.external_pretrain:
            self.validate_external()  # before the run folder is touched
        self.prepare()
        start = time.perf_counter()
        self.train()
        if not self.finished:
            return {"finished": False, "num_timesteps": int(self.session.model.num_timesteps)}
        t0 = time.perf_counter()
        summary = build_report(self.run_dir, self.config, self.session, self.monitor,
                               pretrained=self.pretrained, timings=self.timings)
        self.timings["report_s"] = time.perf_counter() - t0
        self.timings["total_s"] = time.perf_counter() - start
        summary["timings"] = self.timings
        summary["finished"] = True
        atomic_write_json(self.run_dir / "report" / "summary.json", summary)
        log.info("done in %.1f s; report in %s", self.timings["total_s"], self.run_dir / "report")
        return summary
