"""The warm-start stages of the main job: demonstrations, then the policy PPO starts from.

Each function does one stage and can be run alone:

* :func:`demonstrations` collects heuristic demonstrations into ``<run>/demos`` (or reuses the
  set there when it was collected with the same settings);
* :func:`clone` behaviour-clones them into the exact policy PPO trains, saved as
  ``<run>/pretrained/bc_policy.zip`` (or reuses an identical earlier clone), optionally
  fine-tuning an external checkpoint;
* :func:`distill` runs DAgger from the clone toward a teacher router (``dagger`` section,
  :mod:`sb3_warmstart.warmstart.dagger`) in ``<run>/pretrained/dagger`` and saves its last
  round as ``<run>/pretrained/distilled_policy.zip``, the policy PPO then starts from;
* :func:`external` uses an external checkpoint as is (``--skip-bc-training``);
* :func:`check_external` validates one against the environment and the architecture before
  anything is written.

All read the typed :class:`~sb3_warmstart.pipeline.config.TrainingConfig`; the environment is its
already built ``config.env``. The demonstrations', the clone's and DAgger's scalars go to
TensorBoard runs of their own, ``<run>/tensorboard/demos``, ``<run>/tensorboard/bc`` and
``<run>/tensorboard/dagger`` (written whether the stage ran or reused its stored result, so a
fresh run folder always shows them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from llm_cluster_env.config import EnvConfig
from sb3_warmstart.common.normalize import ReturnNormalizer
from sb3_warmstart.pipeline.config import ADDED_SETTINGS, PPOConfig, TrainingConfig
from sb3_warmstart.pipeline.envs import make_base_env, training_env_spec
from sb3_warmstart.policies.policy_file import class_path
from sb3_warmstart.policies.replica_set import policy_class_for

log = logging.getLogger("sb3_warmstart.pipeline.runner")


class WarmStartError(RuntimeError):
    """The warm start cannot proceed (an external checkpoint that does not fit...)."""


@dataclass
class Pretrained:
    """The warm-start policy PPO starts from (and regularises towards).

    :param policy: an SB3 ``ActorCriticPolicy``.
    :param obs_rms: the observation statistics it was trained with (``RunningMeanStd``).
    :param return_normalizer: reward statistics of its value pretraining, if any.
    :param source: where it came from (a path).
    :param summary: its BC metrics.
    """

    policy: Any
    obs_rms: Any
    return_normalizer: ReturnNormalizer | None
    source: str
    summary: dict[str, Any]


def settings_hash(data: Any) -> str:
    """A short hash of JSON-able settings (to tell whether a stored artefact fits)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expected_architecture(ppo: PPOConfig) -> dict[str, Any]:
    """The policy architecture PPO will build (an external checkpoint must match it)."""
    from sb3_warmstart.policies.recurrent import clone_policy_class

    if ppo.replica_set:
        arch: dict[str, Any] = {
            "policy_class": class_path(policy_class_for(True, ppo.recurrent,
                                                        ppo.recurrent_cell)),
            "net_arch": []}
    else:
        arch = {"policy_class": (clone_policy_class(ppo.recurrent_cell) if ppo.recurrent
                                 else "MlpPolicy"),
                "net_arch": list(ppo.net_arch)}
    if ppo.recurrent:
        arch.update(lstm_hidden_size=ppo.lstm_hidden_size, n_lstm_layers=ppo.n_lstm_layers)
    return arch


def _env(config: TrainingConfig) -> gym.Env:
    return make_base_env(training_env_spec(config))


def check_external(config: TrainingConfig) -> None:
    """Validate ``warm_start.external_pretrain`` against the env and the architecture.

    :raises WarmStartError: naming every mismatch.
    """
    from sb3_warmstart.policies.policy_file import PretrainedCheckpointError, validate_pretrained

    source = config.warm_start.external_pretrain
    try:
        validate_pretrained(source, _env(config), expected_arch=expected_architecture(config.ppo))
    except PretrainedCheckpointError as err:
        raise WarmStartError(f"--external-pretrain={source!r}: {err}") from None


def demo_env_config(config: TrainingConfig) -> EnvConfig:
    """The scenario demonstrations are collected on: the training env with episodes of
    ``warm_start.demo_episode_requests`` requests (``train/collect_demos.py`` uses it too)."""
    return dataclasses.replace(config.env,
                               episode_requests=config.warm_start.demo_episode_requests)


def demonstrations(config: TrainingConfig, run_dir: Path, *, force: bool = False,
                   progress: bool = True) -> tuple[list, dict[str, Any]]:
    """Demonstrations for BC in ``run_dir/demos``, reused when collected with these settings.

    :param force: collect again even when the stored set fits.
    :return: ``(trajectories, stats)`` (see
        :func:`sb3_warmstart.warmstart.demo_collect.collect_demonstrations`); their scalars are
        logged to ``run_dir/tensorboard/demos`` (:func:`log_demonstrations`).
    """
    from sb3_warmstart.warmstart.demo_collect import collect_demonstrations
    from sb3_warmstart.warmstart.demo_store import load_demonstrations, save_demonstrations

    ws = config.warm_start
    path = Path(run_dir) / "demos"
    family = config.family_config
    env_config = demo_env_config(config)
    settings = {"env": config.training_identity()["env"],
                "episode_requests": ws.demo_episode_requests, "policies": ws.demo_policies,
                "steps": ws.demo_steps, "imbalance": ws.imbalance, "seed": config.seed}
    if family is not None:
        family = dataclasses.replace(family, episode_requests=ws.demo_episode_requests)
        settings = {"family": config.training_identity()["family"],
                    "episode_requests": ws.demo_episode_requests,
                    "candidates": list(ws.demo_candidates), "margin": ws.demo_margin,
                    "steps": ws.demo_steps, "seed": config.seed}
        if ws.demo_objective != ADDED_SETTINGS["warm_start.demo_objective"]:
            # at the behaviour it was added with, earlier runs' demos keep their fingerprint
            settings["objective"] = ws.demo_objective
    if path.is_dir() and not force:
        try:
            trajectories, stats = load_demonstrations(path)
            if stats.get("pipeline_settings") == settings_hash(settings):
                log.info("demos: reusing %s (%d trajectories)", path, len(trajectories))
                log_demonstrations(run_dir, trajectories, stats)
                return trajectories, stats
            log.info("demos: %s has other settings; collecting again", path)
        except Exception as err:  # a damaged earlier set is replaced, atomically
            log.warning("demos: %s unusable (%s); collecting again", path, err)
    start = time.perf_counter()
    if family is not None:
        from sb3_warmstart.warmstart.family_demos import collect_best_heuristic_demonstrations

        trajectories, stats = collect_best_heuristic_demonstrations(
            family=family, total_steps=ws.demo_steps, seed=config.seed,
            candidates=ws.demo_candidates, margin=ws.demo_margin, objective=ws.demo_objective,
            progress=progress)
        log.info("demos: best heuristic per sampled scenario by %s: %s; lor %.1f%% above the "
                 "best on average", ws.demo_objective, stats["expert_wins"],
                 100 * stats["lor_over_best_mean"])
    else:
        trajectories, stats = collect_demonstrations(
            env_config=env_config, policies=ws.demo_policies, total_steps=ws.demo_steps,
            seed=config.seed, imbalance=ws.imbalance, progress=progress)
    stats["pipeline_settings"] = settings_hash(settings)
    save_demonstrations(path, trajectories, stats)
    log.info("demos: %d steps in %d trajectories (%.1f s)",
             sum(len(t.acts) for t in trajectories), len(trajectories),
             time.perf_counter() - start)
    log_demonstrations(run_dir, trajectories, stats)
    return trajectories, stats


def external(config: TrainingConfig, run_dir: Path) -> Pretrained:
    """The external checkpoint as is: copied into ``run_dir/pretrained/external.zip``."""
    from sb3_warmstart.policies.policy_file import load_pretrained

    copy = _copy_external(config, run_dir)
    model, meta, obs_rms = load_pretrained(copy)
    returns = (ReturnNormalizer.from_dict(meta["return_normalization"])
               if meta.get("return_normalization") else None)
    final = meta.get("bc_metrics", {}).get("final", {})
    return Pretrained(model.policy, obs_rms, returns, str(config.warm_start.external_pretrain),
                      {"fine_tuned": False, **final})


def _copy_external(config: TrainingConfig, run_dir: Path) -> Path:
    source = Path(config.warm_start.external_pretrain)
    folder = Path(run_dir) / "pretrained"
    folder.mkdir(exist_ok=True)
    copy = folder / "external.zip"
    shutil.copyfile(source, copy.with_suffix(".zip.tmp"))
    copy.with_suffix(".zip.tmp").replace(copy)
    log.info("external checkpoint %s validated and copied to %s", source, copy)
    return copy


def clone(config: TrainingConfig, run_dir: Path, trajectories: list, demo_stats: dict[str, Any],
          *, fine_tune_external: bool = False, force: bool = False, progress: bool = True,
          command: list[str] | None = None) -> Pretrained:
    """Behaviour-clone the demonstrations into ``run_dir/pretrained/bc_policy.zip`` (reused
    when an earlier clone had the same settings), from scratch or from the external model.
    """
    from sb3_warmstart.policies.policy_file import (
        PretrainedCheckpointError,
        load_pretrained,
        read_metadata,
        save_pretrained,
    )
    from sb3_warmstart.warmstart.cloning import clone_demonstrations

    ws, ppo, bc = config.warm_start, config.ppo, config.bc
    folder = Path(run_dir) / "pretrained"
    folder.mkdir(parents=True, exist_ok=True)
    init_model = init_obs_rms = None
    if fine_tune_external:
        init_model, _, init_obs_rms = load_pretrained(_copy_external(config, run_dir))
    target = folder / "bc_policy.zip"
    settings = {"demos": demo_stats.get("pipeline_settings"), "bc": dataclasses.asdict(bc),
                "arch": expected_architecture(ppo), "seed": config.seed,
                "external": str(ws.external_pretrain) if init_model else None,
                "gamma": ppo.gamma, "value": ws.value_pretraining,
                "validation_fraction": ws.validation_fraction, "norm_reward": ppo.norm_reward}
    if target.is_file() and not force:
        try:
            meta = read_metadata(target)
            if meta.get("pipeline_settings") == settings_hash(settings):
                model, meta, obs_rms = load_pretrained(target)
                returns = (ReturnNormalizer.from_dict(meta["return_normalization"])
                           if meta.get("return_normalization") else None)
                log.info("BC: reusing %s", target)
                log_behaviour_cloning(run_dir, meta["bc_metrics"].get("history", []))
                return Pretrained(model.policy, obs_rms, returns, str(target),
                                  meta["bc_metrics"]["final"])
        except PretrainedCheckpointError as err:
            log.warning("BC: %s unusable (%s); cloning again", target, err)
    env = _env(config)
    start = time.perf_counter()
    experts = list(ws.demo_policies)
    per_trajectory = (demo_stats["trajectory_policies"] if config.family_config is not None
                      else None)
    result = clone_demonstrations(
        trajectories, env=env, bc=bc, ppo=ppo, seed=config.seed,
        validation_fraction=ws.validation_fraction, value_pretraining=ws.value_pretraining,
        expert=experts[0] if len(experts) == 1 and per_trajectory is None else None,
        experts=per_trajectory, init_model=init_model, init_obs_rms=init_obs_rms,
        progress=progress)
    seconds = time.perf_counter() - start
    metadata = result.metadata(pipeline_settings=settings_hash(settings),
                               env_kwargs=config.env_kwargs,
                               demos={"path": str(Path(run_dir) / "demos"),
                                      "policies": ws.demo_policies, "steps": ws.demo_steps},
                               command=list(command or []))
    save_pretrained(target, result.model.policy, metadata, result.obs_rms,
                    observation_schema=env.unwrapped.layout.schema(),
                    return_normalizer=result.return_normalizer)
    s = result.summary
    log.info("BC (%s): val accuracy %.4f, tie-aware %.4f, predicted share %s vs expert %s "
             "(%.1f s)", "fine-tuned external" if init_model else "from scratch",
             s["val_accuracy"], s["val_tie_accuracy"],
             np.round(s["predicted_share"], 3).tolist() if s["predicted_share"] else None,
             np.round(s["expert_share"], 3).tolist() if s["expert_share"] else None, seconds)
    log_behaviour_cloning(run_dir, [m.as_dict() for m in result.history])
    return Pretrained(result.model.policy, result.obs_rms, result.return_normalizer,
                      str(target), s)


# ------------------------------------------------------------------------------ DAgger
#: ``<run>/pretrained/<DAGGER_FOLDER>``: the DAgger run (:mod:`sb3_warmstart.warmstart.dagger`).
DAGGER_FOLDER = "dagger"
#: ``<run>/pretrained/<DISTILLED_POLICY>``: its last round's policy, what PPO starts from.
DISTILLED_POLICY = "distilled_policy.zip"
#: ``spawn_key`` of the DAgger episodes' seeds (training, demos and evaluation use others).
DAGGER_STREAM = 11


def dagger_loop(config: TrainingConfig):
    """The :class:`~sb3_warmstart.warmstart.dagger.DAggerConfig` of ``config.dagger``: its
    episodes are seeded from their own stream of ``config.seed`` (a 62-bit base, so they
    never meet the evaluation's seeds)."""
    from sb3_warmstart.warmstart.dagger import DAggerConfig

    d = config.dagger
    state = np.random.SeedSequence(config.seed, spawn_key=(DAGGER_STREAM,)).generate_state(
        1, np.uint64)
    return DAggerConfig(teacher=d.teacher, rounds=d.rounds,
                        episodes_per_round=d.episodes_per_round, deterministic=d.deterministic,
                        beta=d.beta, beta_decay=d.beta_decay, fine_tune=d.fine_tune,
                        seed=config.seed, episode_seed_base=int(state[0] >> np.uint64(2)),
                        alternative_teachers=d.alternative_teachers,
                        teacher_margin=d.teacher_margin, cost_temperature=d.cost_temperature,
                        objective=config.warm_start.demo_objective)


def dagger_env_spec(config: TrainingConfig):
    """The scenario or family DAgger routes: the training one, with episodes of
    ``dagger.episode_requests`` requests."""
    return dataclasses.replace(training_env_spec(config),
                               episode_requests=config.dagger.episode_requests)


def dagger_bc(config: TrainingConfig):
    """BC of every DAgger round: ``bc`` with ``dagger.epochs`` epochs (when set)."""
    epochs = config.dagger.epochs
    return config.bc if epochs is None else dataclasses.replace(config.bc, epochs=epochs)


def check_teacher(config: TrainingConfig) -> None:
    """Refuse a DAgger teacher (or alternative teacher) that reads a feature the training env
    lacks, or samples futures the family cannot give it, before any work.

    :raises WarmStartError: naming ``dagger.teacher`` (or ``dagger.alternative_teachers``),
        the value and the reason.
    """
    from sb3_warmstart.warmstart.dagger import check_teacher as check
    from sb3_warmstart.warmstart.dagger import make_env, make_teacher

    if not config.dagger.enabled:
        return
    env = make_env(spec=dagger_env_spec(config))
    family = config.family_config
    named = [("dagger.teacher", config.dagger.teacher),
             *(("dagger.alternative_teachers", n) for n in config.dagger.alternative_teachers)]
    for key, name in named:
        teacher = make_teacher(name)
        try:
            check(env, teacher)
        except ValueError as err:
            raise WarmStartError(f"{key}={name!r}: {err}") from None
        planner = getattr(teacher, "config", None)
        if (family is not None and hasattr(teacher, "sample_arrivals")
                and not getattr(planner, "clairvoyant", True)
                and any(a.kind == "phases" for a in family.arrivals)):
            raise WarmStartError(f"{key}={name!r}: it samples futures of poisson and gamma "
                                 f"arrivals only, and the family {family.name!r} draws phased "
                                 "arrivals too")


def distill(config: TrainingConfig, run_dir: Path, clone: Pretrained, demos: list, *,
            force: bool = False, progress: bool = True) -> Pretrained:
    """DAgger from the clone into ``run_dir/pretrained/dagger`` (resumed when it holds a run of
    these settings, started again when it holds another), then its last round's policy as
    ``run_dir/pretrained/distilled_policy.zip`` (the clone's return statistics kept, so PPO's
    reward normaliser starts where the clone's value head was fitted).

    :param clone: the clone (:func:`clone`), whose file is round 0.
    :param demos: the demonstrations it was cloned from (in every round's aggregate with
        ``dagger.include_demos``).
    :param force: start DAgger again even when the folder holds a run of these settings.
    :param progress: show each round's labelling and cloning as it goes.
    :return: the distilled policy; ``summary["dagger"]`` is :func:`dagger_summary`.
    """
    from sb3_warmstart.policies.policy_file import load_pretrained
    from sb3_warmstart.warmstart.dagger import fingerprint, run_dagger, run_settings

    folder = Path(run_dir) / "pretrained" / DAGGER_FOLDER
    target = Path(run_dir) / "pretrained" / DISTILLED_POLICY
    loop, bc, spec = dagger_loop(config), dagger_bc(config), dagger_env_spec(config)
    aggregate_demos = demos if config.dagger.include_demos else None
    settings = run_settings(loop, None, bc, config.ppo, spec=spec, initial_policy=clone.source,
                            demos=aggregate_demos)
    _clear_other_dagger_run(folder, fingerprint(settings), force)
    start = time.perf_counter()
    result = run_dagger(loop, spec=spec, bc=bc, ppo=config.ppo, out=folder,
                        initial_policy=clone.source, demos=aggregate_demos,
                        progress=lambda line: log.info("DAgger %s", line),
                        show_progress=progress)
    rows = dagger_rounds(folder, loop.rounds)
    summary = {"teacher": loop.teacher, "alternative_teachers": list(loop.alternative_teachers),
               "rounds": rows, "policy": str(target),
               "seconds_this_invocation": round(time.perf_counter() - start, 1)}
    _save_distilled(config, target, result.policy_paths[-1], clone, summary,
                    fingerprint(settings))
    model, meta, obs_rms = load_pretrained(target)
    log_dagger(run_dir, rows)
    log.info("DAgger (teacher %s): agreement of each round's learner with the teacher on the "
             "states it visited %s; aggregate %s states; %s", loop.teacher,
             [round(r["agreement"], 3) for r in rows], rows[-1]["aggregate_states"], target)
    return Pretrained(model.policy, obs_rms, clone.return_normalizer, str(target),
                      {**clone.summary, "distilled": True, "dagger": meta["dagger_summary"]})


def stored_dagger_summary(run_dir: Path) -> dict[str, Any] | None:
    """The DAgger summary kept in ``run_dir/pretrained/distilled_policy.zip`` (``None`` when
    the run distilled nothing): teacher, per-round agreement and aggregate sizes."""
    from sb3_warmstart.policies.policy_file import PretrainedCheckpointError, read_metadata

    path = Path(run_dir) / "pretrained" / DISTILLED_POLICY
    if not path.is_file():
        return None
    try:
        return read_metadata(path).get("dagger_summary")
    except PretrainedCheckpointError as err:
        log.warning("DAgger: %s unreadable (%s)", path, err)
        return None


def _clear_other_dagger_run(folder: Path, fp: str, force: bool) -> None:
    """Remove ``folder`` when it holds a DAgger run of other settings (an earlier clone or demo
    set: the pipeline wrote it, and its labels are of another learner) or ``force``."""
    manifest = folder / "dagger.json"
    if not folder.exists():
        return
    try:
        stored = json.loads(manifest.read_text()).get("fingerprint")
    except (OSError, ValueError):
        stored = None
    if stored == fp and not force:
        return
    log.info("DAgger: %s %s; starting it again", folder,
             "redone (--force-warmstart)" if stored == fp else "holds a run of other settings")
    shutil.rmtree(folder)


def dagger_rounds(folder: Path, rounds: int) -> list[dict[str, Any]]:
    """Per DAgger round ``k >= 1`` of ``folder``: ``agreement`` (share of the states round
    ``k - 1``'s policy visited where its action was the teacher's label), ``states`` (labelled
    this round), ``aggregate_states`` (teacher-labelled states it was trained on),
    ``demo_states`` (demonstrations in its aggregate), ``train_accuracy`` (BC's, on the
    aggregate) and ``teachers`` (episodes labelled by each router, with
    ``dagger.alternative_teachers``)."""
    from sb3_warmstart.policies.policy_file import read_metadata

    rows = []
    for k in range(1, rounds + 1):
        meta = json.loads((folder / f"round_{k}.json").read_text())
        policy = read_metadata(folder / f"policy_round_{k}.zip")
        rows.append({"round": k, "agreement": float(meta["agreement"]),
                     "states": int(meta["states"]),
                     "aggregate_states": int(policy["dagger"]["aggregate_states"]),
                     "demo_states": int(policy["dagger"].get("demo_states", 0)),
                     "train_accuracy": float(policy["bc_metrics"]["final"]["train_accuracy"]),
                     "teachers": dict(meta.get("teachers", {}))})
    return rows


def _save_distilled(config: TrainingConfig, target: Path, last_round: Path, clone: Pretrained,
                    summary: dict[str, Any], fp: str) -> None:
    """Write the last round's policy as ``target`` (kept when it is already this run's)."""
    from sb3_warmstart.policies.policy_file import (
        PretrainedCheckpointError,
        load_pretrained,
        read_metadata,
        save_pretrained,
    )

    if target.is_file():
        try:
            if read_metadata(target).get("pipeline_settings") == fp:
                return
        except PretrainedCheckpointError as err:
            log.warning("DAgger: %s unusable (%s); writing it again", target, err)
    model, meta, obs_rms = load_pretrained(last_round)
    keep = {k: meta[k] for k in ("bc_metrics", "training_kwargs", "policy_kwargs") if k in meta}
    save_pretrained(target, model.policy, {**keep, "pipeline_settings": fp,
                                           "env_kwargs": config.env_kwargs,
                                           "distilled_from": clone.source,
                                           "dagger_summary": summary}, obs_rms,
                    observation_schema=_env(config).unwrapped.layout.schema(),
                    return_normalizer=clone.return_normalizer)


# ------------------------------------------------------------------------------ TensorBoard
#: Sub-folders of ``<run>/tensorboard`` holding the warm-start stages' scalars: runs of their
#: own beside PPO's events, so PPO's purge on resume (:mod:`sb3_warmstart.pipeline.logs`)
#: never touches them and their step axes (BC epochs; step 0 for the demos) never mix with
#: PPO's env steps.
DEMOS_TENSORBOARD = "demos"
BC_TENSORBOARD = "bc"
DAGGER_TENSORBOARD = "dagger"


def _write_scalars(folder: Path, rows: list[tuple[int, dict[str, float | None]]]) -> None:
    """Write ``(step, {tag: value})`` rows as one TensorBoard run in ``folder``, replacing what
    an earlier write there holds (``purge_step=0``: TensorBoard hides every earlier event of the
    run, so redoing a stage never shows two curves). ``None`` and NaN values are skipped."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder), purge_step=0)
    try:
        for step, scalars in rows:
            for tag, value in scalars.items():
                if value is not None and np.isfinite(value):
                    writer.add_scalar(tag, float(value), global_step=step)
    finally:
        writer.close()


def demonstration_scalars(trajectories: list, stats: dict[str, Any]) -> dict[str, float]:
    """Per heuristic (``stats["trajectory_policies"]``, which also names each trajectory's
    expert in family demos): ``demos/<name>/episodes``, ``steps`` (routed requests),
    ``mean_return`` (mean episode return) and ``mean_reward`` (mean reward per step); plus
    ``demos/total_episodes`` and ``demos/total_steps``."""
    names = stats["trajectory_policies"]
    out: dict[str, float] = {"demos/total_episodes": float(len(trajectories)),
                             "demos/total_steps": float(sum(len(t.acts) for t in trajectories))}
    for name in dict.fromkeys(names):
        mine = [t for t, owner in zip(trajectories, names, strict=True) if owner == name]
        returns = [float(np.sum(t.rews, dtype=np.float64)) for t in mine]
        steps = sum(len(t.acts) for t in mine)
        out[f"demos/{name}/episodes"] = float(len(mine))
        out[f"demos/{name}/steps"] = float(steps)
        out[f"demos/{name}/mean_return"] = float(np.mean(returns))
        out[f"demos/{name}/mean_reward"] = float(np.sum(returns) / steps) if steps else 0.0
    return out


def log_demonstrations(run_dir: Path, trajectories: list, stats: dict[str, Any]) -> None:
    """:func:`demonstration_scalars` at step 0 into ``run_dir/tensorboard/demos``."""
    _write_scalars(Path(run_dir) / "tensorboard" / DEMOS_TENSORBOARD,
                   [(0, demonstration_scalars(trajectories, stats))])


def log_behaviour_cloning(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """One row per BC epoch (step = epoch) into ``run_dir/tensorboard/bc``: ``bc/loss``,
    ``bc/accuracy``, ``bc/neglogp``, ``bc/entropy``, ``bc/value_loss``, ``bc/learning_rate``
    and, with a validation split, ``bc/val_accuracy``, ``bc/val_tie_accuracy``, ``bc/val_nll``,
    ``bc/val_value_loss``.

    :param history: ``BCEpochMetrics.as_dict()`` per epoch (as stored in the clone's
        metadata, where NaN became ``None``).
    """
    rows = []
    for epoch in history:
        val = epoch.get("val") or {}
        rows.append((int(epoch["epoch"]), {
            "bc/loss": epoch["train_loss"], "bc/accuracy": epoch["train_accuracy"],
            "bc/neglogp": epoch["train_neglogp"], "bc/entropy": epoch["train_entropy"],
            "bc/value_loss": epoch["train_value_loss"],
            "bc/learning_rate": epoch["learning_rate"],
            **{f"bc/val_{key}": val.get(key)
               for key in ("accuracy", "tie_accuracy", "nll", "value_loss")}}))
    _write_scalars(Path(run_dir) / "tensorboard" / BC_TENSORBOARD, rows)


def log_dagger(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """One row per DAgger round (step = round, from 1) into ``run_dir/tensorboard/dagger``:
    ``dagger/agreement``, ``dagger/states``, ``dagger/aggregate_states``,
    ``dagger/train_accuracy`` (see :func:`dagger_rounds`)."""
    _write_scalars(Path(run_dir) / "tensorboard" / DAGGER_TENSORBOARD,
                   [(row["round"], {f"dagger/{key}": float(row[key]) for key in
                                    ("agreement", "states", "aggregate_states",
                                     "train_accuracy")}) for row in rows])
