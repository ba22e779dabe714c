"""A CleanRL-style rollout loop over a gymnasium vector env of ``LLMCluster-v0``, correct on
gymnasium 0.29 and 1.x alike (see ``docs/vector_envs.md``).

Gymnasium 1.x vector envs reset an ended sub-environment on the *next* ``step()``
(``AutoresetMode.NEXT_STEP``, the default): that step ignores the action and returns the first
observation of the new episode with reward 0 and ``terminated = truncated = False``. It is not
a transition and must not reach the learner; :func:`collect` masks it. Gymnasium 0.29 (and
1.x's ``SAME_STEP``) resets within the step that ends the episode, returning the final
observation in ``info["final_observation"]`` (``info["final_obs"]`` on 1.x): nothing to mask,
but the observation returned then belongs to the new episode.

Run it: ``python examples/vector_env_loop.py`` (4 envs of 128-request episodes, each cut at
96 steps by ``step_limit``, routed by least outstanding requests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

import llm_cluster_env  # noqa: F401  (registers LLMCluster-v0)


@dataclass
class Rollout:
    """The transitions of a rollout, ``[num_steps, num_envs]`` arrays, and the ended episodes.

    :param valid: True for a real transition; False for a 1.x autoreset step (never learn
        from it: its reward is 0 and its action was ignored).
    :param next_obs: the observation that follows each transition (for a truncated episode,
        the state to bootstrap the value on; for a terminated one, its final observation).
    :param episodes: per ended episode: env index, ``terminated``, ``truncated``, steps, return
        (summed reward of its valid transitions) and ``info["metrics"]``.
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    next_obs: np.ndarray
    valid: np.ndarray
    episodes: list[dict] = field(default_factory=list)


def autoreset_on_next_step(envs: gym.vector.VectorEnv) -> bool:
    """Whether ``envs`` resets ended sub-environments on the next step (gymnasium 1.x
    default) rather than within the same step (0.29; 1.x ``SAME_STEP``)."""
    mode = envs.metadata.get("autoreset_mode")
    return mode is not None and getattr(mode, "name", str(mode)) == "NEXT_STEP"


def _final_obs(infos: dict, i: int) -> np.ndarray | None:
    """Sub-env ``i``'s final observation from a same-step autoreset's infos (0.29 or 1.x)."""
    for key in ("final_observation", "final_obs"):
        if key in infos and infos[f"_{key}"][i]:
            return infos[key][i]
    return None


def _episode_metrics(infos: dict, i: int) -> dict:
    """Sub-env ``i``'s ``info["metrics"]`` (0.29 keeps each env's info under ``final_info``
    on a same-step reset; 1.x batches the dict: one array per metric)."""
    if "final_info" in infos and infos["_final_info"][i]:
        final = infos["final_info"]
        if isinstance(final, dict):  # 1.x SAME_STEP: batched
            return {k: float(v[i]) for k, v in final.get("metrics", {}).items()}
        return dict(final[i].get("metrics", {}))
    metrics = infos.get("metrics", {})
    return {k: float(v[i]) for k, v in metrics.items()} if metrics else {}


def collect(envs: gym.vector.VectorEnv, num_steps: int,
            policy: Callable[[np.ndarray], np.ndarray], *, seed: int = 0) -> Rollout:
    """Step ``envs`` ``num_steps`` times with ``policy(obs) -> actions``; mask 1.x autoreset
    steps (``Rollout.valid``) and record every ended episode."""
    n = envs.num_envs
    obs, _ = envs.reset(seed=seed)
    shape = (num_steps, n)
    out = Rollout(obs=np.zeros(shape + obs.shape[1:], np.float32),
                  actions=np.zeros(shape, np.int64), rewards=np.zeros(shape),
                  terminated=np.zeros(shape, bool), truncated=np.zeros(shape, bool),
                  next_obs=np.zeros(shape + obs.shape[1:], np.float32),
                  valid=np.zeros(shape, bool))
    next_step_mode = autoreset_on_next_step(envs)
    resetting = np.zeros(n, bool)  # 1.x: the sub-envs whose next step is an autoreset
    returns = np.zeros(n)
    lengths = np.zeros(n, np.int64)
    for t in range(num_steps):
        actions = policy(obs)
        next_obs, rewards, terminated, truncated, infos = envs.step(actions)
        valid = ~resetting
        out.obs[t], out.actions[t], out.rewards[t] = obs, actions, rewards
        out.terminated[t], out.truncated[t], out.valid[t] = terminated, truncated, valid
        out.next_obs[t] = next_obs
        returns += np.where(valid, rewards, 0.0)
        lengths += valid
        for i in np.flatnonzero(terminated | truncated):
            if not next_step_mode:  # the returned observation already belongs to a new episode
                out.next_obs[t, i] = _final_obs(infos, i)
            out.episodes.append({"env": int(i), "terminated": bool(terminated[i]),
                                 "truncated": bool(truncated[i]), "steps": int(lengths[i]),
                                 "return": float(returns[i]),
                                 "metrics": _episode_metrics(infos, i)})
            returns[i], lengths[i] = 0.0, 0
        if next_step_mode:
            resetting = terminated | truncated
        obs = next_obs
    return out


def least_outstanding(layout) -> Callable[[np.ndarray], np.ndarray]:
    """A batched policy from observations alone: the replica with the fewest queued + running
    requests (lowest index on ties), read through the env's observation layout."""
    def policy(obs: np.ndarray) -> np.ndarray:
        return np.array([int(np.argmin(layout.view(o).outstanding_requests)) for o in obs])
    return policy


def main() -> None:
    num_envs = 4
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make("LLMCluster-v0", episode_requests=128, step_limit=96)
         for _ in range(num_envs)])
    layout = gym.make("LLMCluster-v0", episode_requests=128).unwrapped.layout
    rollout = collect(envs, 400, least_outstanding(layout))
    print(f"gymnasium {gym.__version__}: next-step autoreset = {autoreset_on_next_step(envs)}; "
          f"{int(rollout.valid.sum())} transitions of {rollout.valid.size} steps, "
          f"{len(rollout.episodes)} episodes ended "
          f"({sum(e['truncated'] for e in rollout.episodes)} truncated at 96 steps)")
    envs.close()


if __name__ == "__main__":
    main()
