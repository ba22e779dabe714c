"""Shared fixtures: an explicit RNG, the location of the raw Vidur data, one torch thread."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_STACK = ("torch", "stable_baselines3", "sb3_contrib", "imitation")
HAVE_TRAIN_STACK = all(importlib.util.find_spec(m) is not None for m in TRAIN_STACK)


_TRAIN_IMPORT = re.compile(
    r"^(?:from|import) (?:torch|stable_baselines3|sb3_contrib|imitation|sb3_warmstart)\b",
    re.MULTILINE)


def pytest_ignore_collect(collection_path, config):
    """Without the training stack (the env-only install on gymnasium 1.x), skip whole test
    modules marked ``pytestmark = pytest.mark.train`` or importing the stack at top level."""
    if HAVE_TRAIN_STACK or collection_path.suffix != ".py":
        return None
    text = collection_path.read_text(errors="ignore")
    if "pytestmark = pytest.mark.train" in text or _TRAIN_IMPORT.search(text):
        return True
    return None


def vidur_data_dir() -> Path:
    """``../shared/data/vidur`` next to the checkout, or ``$LLM_CLUSTER_VIDUR_DATA``."""
    override = os.environ.get("LLM_CLUSTER_VIDUR_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "vidur"


def follow_base(env, seed, steps=None, actions=None):
    """The planner benchmark's base-policy replay (``benchmarks.planner.follow_base_policy``)."""
    from benchmarks.planner import follow_base_policy

    return follow_base_policy(env, seed, actions, steps)


def planner(env, **fields):
    """A rollout planner with ``PlannerConfig(**fields)``, bound to ``env`` and reset (seed 0)."""
    from llm_cluster_env.routing.planner import PlannerConfig, RolloutPlannerRouter

    router = RolloutPlannerRouter(PlannerConfig(**fields)).bind(env)
    router.reset(env.num_replicas, np.random.default_rng(0))
    return router


def load_script(name: str):
    """Import ``train/<name>.py`` (a script, not a package module) for its ``main``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"train_{name}", REPO_ROOT / "train" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture
def vidur_data() -> Path:
    """The raw Vidur profiling data and traces; skips the test when they are not present."""
    path = vidur_data_dir()
    if not path.is_dir():
        pytest.skip(f"raw Vidur data not found at {path}")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Torch threads on 2 busy cores slowed a train step 100x: tests use one."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(1)
    yield
