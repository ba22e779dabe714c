"""Trained policies from where the main job leaves them: run folders, checkpoint
directories and policy zips (:mod:`sb3_warmstart.policies.policy_file`), plus a run's
``training_history.csv``."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm

from sb3_warmstart.policies.policy_file import load_pretrained


def read_history(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``training_history.csv`` (numbers parsed; empty when absent)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                if value in ("", None):
                    continue
                for kind in (int, float):  # episode seeds are 63-bit integers: keep them exact
                    try:
                        parsed[key] = kind(value)
                        break
                    except ValueError:
                        continue
                else:
                    parsed[key] = value
            rows.append(parsed)
    return rows


def _algorithm(ppo: dict[str, Any]) -> type[BaseAlgorithm]:
    """The algorithm class a saved ``ppo`` config section trained with."""
    from sb3_warmstart.algorithms.ppo import KLPPO, KLRecurrentPPO

    return KLRecurrentPPO if ppo["algorithm"] == "recurrent_ppo" else KLPPO


def load_policy(model_path: str | os.PathLike
                ) -> tuple[BaseAlgorithm, Any, dict[str, Any], list[dict[str, Any]], str]:
    """``(model, obs_rms, env_kwargs, history_rows, label)`` of a saved policy: a run folder of
    ``train/warmstart.py`` (``final_model.zip``, ``final_vecnormalize.pkl``, its training
    history), a checkpoint directory, or a policy zip of :func:`save_pretrained`."""
    import yaml

    from sb3_warmstart.common.checkpoint import MODEL_FILE, STATE_FILE, CheckpointManager

    model_path = Path(model_path)

    if model_path.is_dir() and (model_path / "final_model.zip").is_file():
        config = yaml.safe_load((model_path / "config.yaml").read_text())
        section = next(iter(config["LLMCluster-v0"].values()))
        model = _algorithm(section["ppo"]).load(model_path / "final_model.zip", device="cpu")
        with open(model_path / "final_vecnormalize.pkl", "rb") as f:
            obs_rms = pickle.load(f).obs_rms
        return (model, obs_rms, section["env_kwargs"],
                read_history(model_path / "training_history.csv"), model_path.name)
    if model_path.is_dir() and (model_path / STATE_FILE).is_file():
        manifest = CheckpointManager(model_path.parent, max_checkpoints=1).verify(model_path)
        training = manifest["fingerprint"]["training"]
        model = _algorithm(training["ppo"]).load(model_path / MODEL_FILE, device="cpu")
        state = pickle.loads((model_path / STATE_FILE).read_bytes())
        history = state["stateful"].get("monitor", {}).get("rows", [])
        return (model, state["vecnormalize"]["obs_rms"], training["env_kwargs"], history,
                model_path.name)
    model, meta, obs_rms = load_pretrained(model_path)
    return model, obs_rms, dict(meta.get("env_kwargs") or {}), [], model_path.stem


__all__ = ["load_policy", "read_history"]
