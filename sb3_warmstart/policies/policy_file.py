"""Pretrained-policy checkpoints: one SB3-loadable zip that also carries its metadata.

File format
-----------
``save_pretrained("run/bc.zip", ...)`` writes a single zip archive (``.zip`` is appended when the
path has no suffix):

* the members ``model.save()`` writes for a ``RecurrentPPO`` (recurrent policy) or ``PPO``
  (feed-forward) whose policy holds the cloned weights, so ``RecurrentPPO.load(path)``,
  ``PPO.load(path)`` and ``model.set_parameters(path)`` work unchanged (SB3 ignores members that
  are not ``data``, ``*.pth`` or ``*.txt``);
* ``warmstart_meta.json`` (:data:`META_MEMBER`): format and version, algorithm and policy class
  paths, architecture (``net_arch``, activation, LSTM size/layers, ``shared_lstm``,
  ``enable_critic_lstm``, ...), observation shape, action count, the env's observation schema
  (``layout.schema()``: feature names, ``num_replicas``, ``history_window``, oracle flag),
  observation (and optional return) normalisation statistics with ``clip``/``epsilon``, library
  versions, creation time, and whatever provenance the caller passes (BC metrics, demo source,
  env kwargs, command line). ``unzip -p bc.zip warmstart_meta.json`` shows it.

The archive is built in memory, written to a temporary file next to the target, fsynced and
moved into place with ``os.replace``: readers see the old file or the new one, never half. On
load every member's CRC is checked before anything is deserialised, so a truncated or corrupt
file raises :class:`PretrainedCheckpointError` instead of loading half a model.

:func:`validate_pretrained` compares a checkpoint with an environment (and optionally with the
architecture the caller is about to build) and lists every mismatch in one
:class:`PretrainedMismatchError`.
"""

from __future__ import annotations

import importlib
import io
import json
import math
import os
import platform
import time
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from sb3_contrib import RecurrentPPO
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecEnv

from llm_cluster_env.atomic import atomic_write_bytes
from sb3_warmstart.common.normalize import ObsNormalizer, ReturnNormalizer

FORMAT = "sb3_warmstart/pretrained"
FORMAT_VERSION = 1
META_MEMBER = "warmstart_meta.json"
REQUIRED_MEMBERS = ("data", "policy.pth", META_MEMBER)
_EOCD_SIGNATURE = b"PK\x05\x06"  # zip end-of-central-directory record, 22 bytes without comment
_EOCD_SIZE = 22
_FROM_METADATA = object()  # sentinel: take the observation schema from the metadata
RESERVED_KEYS = frozenset({
    "format", "format_version", "algorithm", "policy_class", "architecture",
    "observation_shape", "action_count", "observation_schema", "obs_normalization",
    "return_normalization", "versions", "created_utc",
})
VERSIONED_PACKAGES = ("torch", "stable-baselines3", "sb3-contrib", "gymnasium", "numpy",
                      "imitation", "llm-cluster-rl")
ARCHITECTURE_KEYS = ("policy_class", "recurrent", "net_arch", "activation_fn",
                     "share_features_extractor", "features_extractor_class", "lstm_hidden_size",
                     "n_lstm_layers", "shared_lstm", "enable_critic_lstm")


class PretrainedCheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, corrupt or not written by :func:`save_pretrained`."""


class PretrainedMismatchError(PretrainedCheckpointError):
    """A checkpoint does not fit an environment or architecture; ``mismatches`` lists each."""

    def __init__(self, source: str, mismatches: list[str]) -> None:
        self.source = source
        self.mismatches = list(mismatches)
        lines = "\n".join(f"  - {m}" for m in self.mismatches)
        super().__init__(f"{source}: {len(self.mismatches)} mismatch(es) between the checkpoint "
                         f"and the environment/architecture:\n{lines}")


# --------------------------------------------------------------------------- architecture
def class_path(obj: type | Any) -> str:
    """``module.QualName`` of a class (or of an instance's class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _net_arch(net_arch: Any) -> dict[str, list[int]]:
    if net_arch is None:
        return {"pi": [64, 64], "vf": [64, 64]}  # ActorCriticPolicy's default for MLP inputs
    if isinstance(net_arch, Mapping):
        return {"pi": [int(x) for x in net_arch.get("pi", [])],
                "vf": [int(x) for x in net_arch.get("vf", [])]}
    layers = [int(x) for x in net_arch]
    return {"pi": layers, "vf": list(layers)}


def architecture_of(policy: ActorCriticPolicy) -> dict[str, Any]:
    """The architecture of a built policy, in the canonical JSON-able form stored in metadata."""
    arch: dict[str, Any] = {
        "policy_class": class_path(policy),
        "recurrent": isinstance(policy, RecurrentActorCriticPolicy),
        "net_arch": _net_arch(policy.net_arch),
        "activation_fn": class_path(policy.activation_fn),
        "share_features_extractor": bool(policy.share_features_extractor),
        "features_extractor_class": class_path(policy.features_extractor_class),
    }
    if isinstance(policy, RecurrentActorCriticPolicy):
        arch.update(lstm_hidden_size=int(policy.lstm_actor.hidden_size),
                    n_lstm_layers=int(policy.lstm_actor.num_layers),
                    shared_lstm=bool(policy.shared_lstm),
                    enable_critic_lstm=bool(policy.enable_critic_lstm))
    return arch


def normalize_architecture(arch: Mapping[str, Any]) -> dict[str, Any]:
    """Canonical form of a partial architecture: ``policy_kwargs``-style values (``net_arch``
    lists, classes, policy aliases such as ``"MlpLstmPolicy"``) become what
    :func:`architecture_of` stores. ``ValueError`` names an unknown key."""
    unknown = sorted(set(arch) - set(ARCHITECTURE_KEYS))
    if unknown:
        raise ValueError(f"expected_arch: unknown key(s) {unknown} (known: "
                         f"{', '.join(ARCHITECTURE_KEYS)})")
    out: dict[str, Any] = {}
    for key, value in arch.items():
        if key == "net_arch":
            out[key] = _net_arch(value)
        elif key == "policy_class":
            out[key] = _policy_class_path(value)
        elif key in ("activation_fn", "features_extractor_class"):
            out[key] = class_path(value) if isinstance(value, type) else str(value)
        elif key in ("lstm_hidden_size", "n_lstm_layers"):
            out[key] = int(value)
        else:
            out[key] = bool(value)
    return out


def _policy_class_path(value: Any) -> str:
    if isinstance(value, type):
        return class_path(value)
    aliases = {**PPO.policy_aliases, **RecurrentPPO.policy_aliases}
    return class_path(aliases[value]) if value in aliases else str(value)


def _same_class(a: str, b: str) -> bool:
    """Dotted paths name the same class; a bare name matches the last component."""
    return a == b or ("." not in b and a.rsplit(".", 1)[-1] == b) or (
        "." not in a and b.rsplit(".", 1)[-1] == a)


def policy_kwargs_of(policy: ActorCriticPolicy) -> dict[str, Any]:
    """Constructor keyword arguments that rebuild ``policy`` (minus spaces, LR schedule and
    ``use_sde``, which the algorithm passes itself). sb3-contrib 2.9's recurrent policy does not
    report its LSTM arguments in ``_get_constructor_parameters``; they are read off the
    modules unless a subclass reports them."""
    kwargs = dict(policy._get_constructor_parameters())
    for key in ("observation_space", "action_space", "lr_schedule", "use_sde"):
        kwargs.pop(key, None)
    if isinstance(policy, RecurrentActorCriticPolicy):
        kwargs.setdefault("lstm_hidden_size", policy.lstm_actor.hidden_size)
        kwargs.setdefault("n_lstm_layers", policy.lstm_actor.num_layers)
        kwargs.setdefault("shared_lstm", policy.shared_lstm)
        kwargs.setdefault("enable_critic_lstm", policy.enable_critic_lstm)
        kwargs.setdefault("lstm_kwargs", dict(policy.lstm_kwargs))
    return kwargs


# ------------------------------------------------------------------------------ building
class SpacesEnv(gym.Env):
    """A do-nothing env with given spaces: lets SB3 build an algorithm object for saving.

    :param observation_space: the policy's observation space.
    :param action_space: the policy's action space.
    """

    metadata = {"render_modes": []}

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space = observation_space
        self.action_space = action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(self.observation_space.shape, self.observation_space.dtype), {}

    def step(self, action):
        obs = np.zeros(self.observation_space.shape, self.observation_space.dtype)
        return obs, 0.0, True, False, {}


def default_algorithm(policy: ActorCriticPolicy) -> type[BaseAlgorithm]:
    """``RecurrentPPO`` for recurrent policies, ``PPO`` for feed-forward ones."""
    return RecurrentPPO if isinstance(policy, RecurrentActorCriticPolicy) else PPO


def build_model(policy: str | type[ActorCriticPolicy], observation_space: spaces.Space,
                action_space: spaces.Space, *, recurrent: bool,
                policy_kwargs: Mapping[str, Any] | None = None, seed: int | None = None,
                algorithm_class: type[BaseAlgorithm] | None = None,
                algorithm_kwargs: Mapping[str, Any] | None = None,
                device: str = "cpu") -> BaseAlgorithm:
    """A ``RecurrentPPO``/``PPO`` on a :class:`SpacesEnv`: its ``.policy`` is exactly the
    object PPO trains, ready for :class:`~sb3_warmstart.warmstart.bc.SequenceBC`.

    :param policy: policy class or alias (``"MlpLstmPolicy"``, ``"MlpPolicy"``).
    :param recurrent: choose ``RecurrentPPO`` (else ``PPO``) when ``algorithm_class`` is None.
    :param policy_kwargs: policy constructor arguments (``net_arch``, ``lstm_hidden_size``...).
    :param seed: seeds SB3's generators (and so the initial weights).
    :param algorithm_class: algorithm to build (a subclass of PPO/RecurrentPPO, say).
    :param algorithm_kwargs: further algorithm constructor arguments (``gamma``, ``n_steps``...).
    :param device: torch device.
    """
    cls = algorithm_class or (RecurrentPPO if recurrent else PPO)
    return cls(policy, SpacesEnv(observation_space, action_space),
               policy_kwargs=dict(policy_kwargs or {}), seed=seed, device=device,
               **dict(algorithm_kwargs or {}))


# -------------------------------------------------------------------------------- saving
def library_versions(packages: Sequence[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    """The Python version and the installed version of each of ``packages``."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _jsonable(value: Any, where: str) -> Any:
    """Plain JSON types; NaN/inf become ``None``; ``TypeError`` names the offending key."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return _jsonable(asdict(value), where)
    raise TypeError(f"metadata{where}: {type(value).__name__} is not JSON-serialisable")


def _target_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p if p.suffix else p.with_suffix(".zip")


def save_pretrained(
    path: str | os.PathLike,
    policy: ActorCriticPolicy,
    metadata: Mapping[str, Any] | None,
    obs_rms: RunningMeanStd | ObsNormalizer | None,
    *,
    observation_schema: Mapping[str, Any] | None | object = _FROM_METADATA,
    return_normalizer: ReturnNormalizer | None = None,
    algorithm_class: type[BaseAlgorithm] | None = None,
    algorithm_kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``policy`` as an SB3 model zip with embedded metadata; returns the path written.

    :param path: target file (``.zip`` appended when it has no suffix); parent dirs are made.
    :param policy: the trained (Recurrent)ActorCriticPolicy; copied into a fresh algorithm object
        built on its own spaces (the copy must accept its ``state_dict`` strictly).
    :param metadata: caller provenance stored at the top level of the metadata (e.g.
        ``bc_metrics``, ``demos``, ``env_kwargs``, ``command``); may not use reserved keys
        (:data:`RESERVED_KEYS`).
    :param obs_rms: the observation statistics BC trained with (``VecNormalize`` defaults for
        clip/epsilon when a bare ``RunningMeanStd``), or ``None`` for raw observations.
    :param observation_schema: ``env.unwrapped.layout.schema()`` of the env the demos came
        from; may instead be given as ``metadata["observation_schema"]``, and must be given one
        way or the other (``None`` explicitly for envs without a layout: validation then checks
        shapes only).
    :param return_normalizer: the reward normalisation used for value pretraining, if any.
    :param algorithm_class: algorithm to wrap the policy in (default: :func:`default_algorithm`).
    :param algorithm_kwargs: algorithm constructor arguments to store (``gamma``, ``n_steps``...).
    """
    if not isinstance(policy, ActorCriticPolicy):
        raise TypeError(f"policy: expected an SB3 ActorCriticPolicy, got {type(policy).__name__}")
    user = dict(metadata or {})
    if observation_schema is _FROM_METADATA:
        if "observation_schema" not in user:
            raise ValueError("observation_schema: required (env.unwrapped.layout.schema()), as "
                             "a keyword or metadata['observation_schema']; None if the env has "
                             "no layout")
        observation_schema = user.pop("observation_schema")
    clash = sorted(RESERVED_KEYS & set(user))
    if clash:
        raise ValueError(f"metadata: key(s) {clash} are reserved (written by save_pretrained)")
    normalizer = ObsNormalizer(obs_rms) if isinstance(obs_rms, RunningMeanStd) else obs_rms
    obs_shape = tuple(policy.observation_space.shape)
    if normalizer is not None and normalizer.shape != obs_shape:
        raise ValueError(f"obs_rms: statistics have shape {normalizer.shape}, the policy's "
                         f"observations {obs_shape}")
    if not isinstance(policy.action_space, spaces.Discrete):
        raise TypeError(f"policy.action_space={policy.action_space}: only Discrete actions")

    algo_cls = algorithm_class or default_algorithm(policy)
    model = build_model(type(policy), policy.observation_space, policy.action_space,
                        recurrent=isinstance(policy, RecurrentActorCriticPolicy),
                        policy_kwargs=policy_kwargs_of(policy), algorithm_class=algo_cls,
                        algorithm_kwargs=algorithm_kwargs, device=str(policy.device))
    model.policy.load_state_dict(policy.state_dict(), strict=True)
    if architecture_of(model.policy) != architecture_of(policy):
        raise RuntimeError("the rebuilt policy's architecture differs from the trained one: "
                           f"{architecture_of(model.policy)} vs {architecture_of(policy)}")

    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "algorithm": class_path(algo_cls),
        "policy_class": class_path(policy),
        "architecture": architecture_of(policy),
        "observation_shape": list(obs_shape),
        "action_count": int(policy.action_space.n),
        "observation_schema": dict(observation_schema) if observation_schema else None,
        "obs_normalization": normalizer.to_dict() if normalizer is not None else None,
        "return_normalization": (return_normalizer.to_dict()
                                 if return_normalizer is not None else None),
        "versions": library_versions(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta.update(user)
    text = json.dumps(_jsonable(meta, ""), indent=2, allow_nan=False)

    buffer = io.BytesIO()
    model.save(buffer)
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(META_MEMBER, text)
    target = _target_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buffer.getvalue())
    return target


# ------------------------------------------------------------------------------- loading
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a checkpoint after checking the whole archive (every member's CRC).

    ``PretrainedCheckpointError`` for a missing path, a directory, a truncated/corrupt archive,
    missing members, unparsable metadata or an unknown format version.
    """
    p = Path(path)
    if not p.exists():
        raise PretrainedCheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise PretrainedCheckpointError(f"checkpoint {p}: not a file")
    size = p.stat().st_size
    with open(p, "rb") as f:  # our archives have no comment: the end record closes the file
        f.seek(max(size - _EOCD_SIZE, 0))
        tail = f.read()
    if len(tail) < _EOCD_SIZE or tail[:4] != _EOCD_SIGNATURE:
        raise PretrainedCheckpointError(
            f"checkpoint {p}: not a complete zip archive (no end-of-archive record at the end "
            f"of its {size} bytes: truncated or corrupt)")
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
            raw = archive.read(META_MEMBER) if META_MEMBER in names else None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise PretrainedCheckpointError(
            f"checkpoint {p}: not a readable zip archive (truncated or corrupt file, {size} "
            f"bytes): {exc}") from exc
    if bad is not None:
        raise PretrainedCheckpointError(
            f"checkpoint {p}: member {bad!r} fails its CRC check (corrupt file)")
    missing = [m for m in REQUIRED_MEMBERS if m not in names]
    if missing:
        raise PretrainedCheckpointError(
            f"checkpoint {p}: missing member(s) {missing}; not written by "
            "sb3_warmstart.policies.policy_file.save_pretrained")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PretrainedCheckpointError(
            f"checkpoint {p}: {META_MEMBER} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PretrainedCheckpointError(
            f"checkpoint {p}: {META_MEMBER} has format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise PretrainedCheckpointError(
            f"checkpoint {p}: format_version={version!r}, this code reads 1..{FORMAT_VERSION}")
    return meta


def _resolve_algorithm(dotted: str, source: Path) -> type[BaseAlgorithm]:
    module_name, _, name = str(dotted).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise PretrainedCheckpointError(
            f"checkpoint {source}: algorithm class {dotted!r} cannot be imported: "
            f"{exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseAlgorithm)):
        raise PretrainedCheckpointError(
            f"checkpoint {source}: algorithm {dotted!r} is not an SB3 algorithm class")
    return cls


def obs_rms_from_metadata(meta: Mapping[str, Any]) -> RunningMeanStd | None:
    """The stored observation statistics as a ``RunningMeanStd`` (``None`` if none stored)."""
    data = meta.get("obs_normalization")
    return ObsNormalizer.from_dict(data).obs_rms if data else None


def obs_normalizer_from_metadata(meta: Mapping[str, Any]) -> ObsNormalizer | None:
    """The stored observation statistics with their ``clip_obs``/``epsilon``."""
    data = meta.get("obs_normalization")
    return ObsNormalizer.from_dict(data) if data else None


def load_pretrained(path: str | os.PathLike, device: str = "cpu"
                    ) -> tuple[BaseAlgorithm, dict[str, Any], RunningMeanStd | None]:
    """Load ``(model, metadata, obs_rms)``; the archive is verified before SB3 reads it.

    Load ``obs_rms`` into PPO's ``VecNormalize.obs_rms`` (or use
    :func:`obs_normalizer_from_metadata` to get clip/epsilon too).
    """
    p = _target_path(path) if not Path(path).exists() else Path(path)
    meta = read_metadata(p)
    cls = _resolve_algorithm(meta.get("algorithm", ""), p)
    try:
        model = cls.load(p, device=device)
    except Exception as exc:  # SB3/torch raise many types; never return half a model
        raise PretrainedCheckpointError(
            f"checkpoint {p}: {cls.__name__}.load failed: {exc}") from exc
    try:
        obs_rms = obs_rms_from_metadata(meta)
    except (ValueError, KeyError) as exc:
        raise PretrainedCheckpointError(f"checkpoint {p}: bad obs_normalization: {exc}") from exc
    return model, meta, obs_rms


# ---------------------------------------------------------------------------- validation
def _env_facts(env: Any) -> tuple[dict | None, tuple[int, ...], int | None]:
    """(observation schema or None, observation shape, action count or None) of an env."""
    if isinstance(env, VecEnv):
        try:
            layout = env.get_attr("layout", indices=[0])[0]
        except AttributeError:
            layout = None
    else:
        layout = getattr(getattr(env, "unwrapped", env), "layout", None)
    schema = layout.schema() if layout is not None else None
    action_space = env.action_space
    n = int(action_space.n) if isinstance(action_space, spaces.Discrete) else None
    return schema, tuple(env.observation_space.shape), n


def _compare_schema(ckpt: Mapping[str, Any], env: Mapping[str, Any]) -> list[str]:
    out = []
    for key in ("num_replicas", "history_window", "output_length_oracle"):
        if ckpt.get(key) != env.get(key):
            out.append(f"{key}: checkpoint {ckpt.get(key)!r}, env {env.get(key)!r}")
    if list(ckpt.get("replica_features", [])) != list(env.get("replica_features", [])):
        out.append(f"replica_features: checkpoint {list(ckpt.get('replica_features', []))}, "
                   f"env {list(env.get('replica_features', []))}")
    a = list(ckpt.get("feature_names", []))
    b = list(env.get("feature_names", []))
    for i in range(max(len(a), len(b))):
        x = repr(a[i]) if i < len(a) else "none"
        y = repr(b[i]) if i < len(b) else "none"
        if x != y:
            out.append(f"observation feature {i}: checkpoint has {x}, env has {y}")
    return out


def _compare_architecture(ckpt: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    out = []
    for key, want in normalize_architecture(expected).items():
        have = ckpt.get(key)
        if key in ("policy_class", "activation_fn", "features_extractor_class"):
            if have is None or not _same_class(str(have), str(want)):
                label = "policy class" if key == "policy_class" else key
                out.append(f"{label}: checkpoint {have!r}, expected {want!r}")
        elif have != want:
            out.append(f"{key}: checkpoint {have!r}, expected {want!r}")
    return out


def validate_pretrained(path_or_metadata: str | os.PathLike | Mapping[str, Any], env: Any,
                        expected_arch: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`PretrainedMismatchError` listing every way the checkpoint does not fit.

    Checked: observation shape, action count, the observation schema (``num_replicas``,
    ``history_window``, ``output_length_oracle``, replica feature list, every feature name by
    index), the normalisation statistics' shape, and -- for each key of ``expected_arch``
    (``policy_kwargs``-style, see :data:`ARCHITECTURE_KEYS`) -- the stored architecture.

    :param path_or_metadata: a checkpoint path (fully verified first;
        ``PretrainedCheckpointError`` if missing or corrupt) or its metadata dict.
    :param env: a gymnasium env (any wrappers) or an SB3 ``VecEnv`` (e.g. ``VecNormalize``).
    :param expected_arch: the architecture about to be built, e.g. PPO's ``policy_kwargs``
        plus ``policy_class``, or ``architecture_of(model.policy)``.
    """
    if isinstance(path_or_metadata, Mapping):
        meta, source = dict(path_or_metadata), "checkpoint metadata"
    else:
        meta, source = read_metadata(path_or_metadata), str(path_or_metadata)
    schema, obs_shape, n_actions = _env_facts(env)
    mismatches: list[str] = []
    ckpt_shape = tuple(meta.get("observation_shape") or ())
    if ckpt_shape != obs_shape:
        mismatches.append(f"observation shape: checkpoint {ckpt_shape}, env {obs_shape}")
    if meta.get("action_count") != n_actions:
        mismatches.append(f"action count: checkpoint {meta.get('action_count')}, "
                          f"env {n_actions if n_actions is not None else env.action_space}")
    ckpt_schema = meta.get("observation_schema")
    if ckpt_schema is not None and schema is None:
        mismatches.append("observation schema: the env exposes no observation layout "
                          "(env.unwrapped.layout)")
    elif ckpt_schema is None and schema is not None:
        mismatches.append("observation schema: the checkpoint stores none, the env has one")
    elif ckpt_schema is not None and schema is not None:
        mismatches += _compare_schema(ckpt_schema, schema)
    norm = meta.get("obs_normalization")
    if norm:
        n_stats = len(norm.get("mean", []))
        if (n_stats,) != obs_shape:
            mismatches.append(f"obs normalisation: statistics for {n_stats} features, env "
                              f"observations have shape {obs_shape}")
    if expected_arch:
        mismatches += _compare_architecture(meta.get("architecture") or {}, expected_arch)
    if mismatches:
        raise PretrainedMismatchError(source, mismatches)


__all__ = [
    "ARCHITECTURE_KEYS",
    "FORMAT",
    "FORMAT_VERSION",
    "META_MEMBER",
    "PretrainedCheckpointError",
    "PretrainedMismatchError",
    "SpacesEnv",
    "architecture_of",
    "build_model",
    "default_algorithm",
    "load_pretrained",
    "normalize_architecture",
    "obs_normalizer_from_metadata",
    "obs_rms_from_metadata",
    "policy_kwargs_of",
    "read_metadata",
    "save_pretrained",
    "validate_pretrained",
]
