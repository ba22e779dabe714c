"""Take a trained router out of the simulator: an ONNX graph of the acting policy, its schema,
and SB3 artefacts that load without this project.

``train/export.py RUN --out DIR`` is the command line; :func:`export_router` does the work:

``policy.onnx``
    the greedy actor of the policy with every input transformation inside the graph
    (:func:`policy_graph`). Replica-set policies (:mod:`sb3_warmstart.policies.replica_set`) take
    ``replicas: float32[batch, N, F]`` (one row per replica, ``N`` a dynamic axis: the same
    file routes any cluster size) and ``request: float32[batch, T]``; their log1p scaling and
    standardisation are buffers of the network already. MLP policies take the flat
    ``observation: float32[batch, D]`` with ``VecNormalize``'s mean, variance, epsilon and
    clip folded in (computed in float64, as ``VecNormalize`` does). Outputs: ``logits`` and
    ``probabilities`` ``[batch, N]``. Recurrent policies also take ``lstm_h``/``lstm_c``
    ``[layers, batch, hidden]`` and return ``lstm_h_out``/``lstm_c_out`` (zeros at an episode
    start).
``schema.json``
    the feature list (:func:`llm_cluster_env.deploy.feature_catalog.deployment_schema`: names in
    order, units, meaning, engine metric or router-computed, vLLM ``/metrics`` names), how the
    replica count is handled, the tensors' names and shapes, the simulator's static features
    of every GPU it models for the training model (``reference_hardware``), the export check
    (ONNX vs torch on observations of the training environment) and provenance.
``router_runtime.py``, ``vllm_router_adapter.py``
    copies of :mod:`llm_cluster_env.deploy.router_runtime` (numpy + onnxruntime) and
    :mod:`llm_cluster_env.deploy.vllm_router_adapter`, so the folder is all a deployment needs.
``sb3/``
    ``router_policies/`` (the policy classes, importable with torch + SB3 + sb3-contrib only)
    whose ``custom_objects(zip)`` makes stock ``PPO.load``/``RecurrentPPO.load`` read the
    run's ``final_model.zip`` and checkpoints; ``vecnormalize.json`` (the normaliser's
    statistics); ``README.md`` (the recipe).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from llm_cluster_env.atomic import atomic_write_json
from sb3_warmstart.common.normalize import ObsNormalizer
from sb3_warmstart.policies.replica_set import SET_POLICIES

SCHEMA_FORMAT = "llm-cluster-rl/router-export"
SCHEMA_VERSION = 1
ONNX_FILE = "policy.onnx"
SCHEMA_FILE = "schema.json"
OPSET = 18


class ExportError(RuntimeError):
    """The source cannot be exported (no final model, an unsupported policy, a graph that
    does not reproduce the policy)."""


# --------------------------------------------------------------------------- graphs
class SetPolicyGraph(nn.Module):
    """The greedy actor of a feed-forward replica-set policy on ``(replicas, request)``."""

    def __init__(self, policy: ActorCriticPolicy) -> None:
        super().__init__()
        self.extractor = policy.features_extractor
        self.heads = policy.mlp_extractor

    def forward(self, replicas: th.Tensor, request: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        summary, h, mask = self.extractor.encode_set(replicas, request)
        logits = self.heads.score_replicas(summary, h, mask)
        return logits, th.softmax(logits, dim=-1)


class RecurrentSetPolicyGraph(nn.Module):
    """One step of a recurrent replica-set policy: the LSTM reads the cluster summary."""

    def __init__(self, policy: RecurrentActorCriticPolicy) -> None:
        super().__init__()
        self.extractor = policy.features_extractor
        self.heads = policy.mlp_extractor
        self.lstm = policy.lstm_actor

    def forward(self, replicas: th.Tensor, request: th.Tensor, lstm_h: th.Tensor,
                lstm_c: th.Tensor) -> tuple[th.Tensor, ...]:
        summary, h, mask = self.extractor.encode_set(replicas, request)
        z, (h_out, c_out) = self.lstm(summary.unsqueeze(0), (lstm_h, lstm_c))
        logits = self.heads.score_replicas(z[0], h, mask)
        return logits, th.softmax(logits, dim=-1), h_out, c_out


class _FoldedNormalizer(nn.Module):
    """``VecNormalize``'s observation transform in float64, cast to float32 at the end."""

    def __init__(self, normalizer: ObsNormalizer | None, size: int) -> None:
        super().__init__()
        if normalizer is None:
            mean, std, clip = np.zeros(size), np.ones(size), np.inf
        else:
            mean = np.asarray(normalizer.obs_rms.mean, dtype=np.float64)
            std = np.sqrt(np.asarray(normalizer.obs_rms.var, dtype=np.float64)
                          + normalizer.epsilon)
            clip = float(normalizer.clip_obs)
        self.register_buffer("mean", th.as_tensor(mean, dtype=th.float64))
        self.register_buffer("std", th.as_tensor(std, dtype=th.float64))
        self.clip = clip
        self.enabled = normalizer is not None

    def forward(self, obs: th.Tensor) -> th.Tensor:
        if not self.enabled:
            return obs
        x = (obs.to(th.float64) - self.mean) / self.std
        return x.clamp(-self.clip, self.clip).to(th.float32)


class FlatPolicyGraph(nn.Module):
    """The greedy actor of SB3's MLP policy on the raw flat observation."""

    def __init__(self, policy: ActorCriticPolicy, normalizer: ObsNormalizer | None) -> None:
        super().__init__()
        self.policy = policy
        self.normalize = _FoldedNormalizer(normalizer, int(np.prod(policy.observation_space.shape)))

    def forward(self, observation: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        policy = self.policy
        features = ActorCriticPolicy.extract_features(policy, self.normalize(observation),
                                                      policy.pi_features_extractor)
        logits = policy.action_net(policy.mlp_extractor.forward_actor(features))
        return logits, th.softmax(logits, dim=-1)


class RecurrentFlatPolicyGraph(nn.Module):
    """One step of sb3-contrib's MLP-LSTM policy on the raw flat observation."""

    def __init__(self, policy: RecurrentActorCriticPolicy, normalizer: ObsNormalizer | None
                 ) -> None:
        super().__init__()
        self.policy = policy
        self.normalize = _FoldedNormalizer(normalizer, int(np.prod(policy.observation_space.shape)))

    def forward(self, observation: th.Tensor, lstm_h: th.Tensor, lstm_c: th.Tensor
                ) -> tuple[th.Tensor, ...]:
        policy = self.policy
        features = ActorCriticPolicy.extract_features(policy, self.normalize(observation),
                                                      policy.pi_features_extractor)
        z, (h_out, c_out) = policy.lstm_actor(features.unsqueeze(0), (lstm_h, lstm_c))
        logits = policy.action_net(policy.mlp_extractor.forward_actor(z[0]))
        return logits, th.softmax(logits, dim=-1), h_out, c_out


@dataclass(frozen=True)
class GraphSpec:
    """What :func:`policy_graph` built: the module, its kind and its tensors.

    :param kind: ``replica_set`` (dynamic replica count) or ``flat`` (fixed).
    :param recurrent: whether the graph carries LSTM state.
    :param inputs: input names in call order.
    :param outputs: output names.
    :param lstm_shape: ``(layers, hidden)`` of the recurrent state, else ``None``.
    """

    module: nn.Module
    kind: str
    recurrent: bool
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    lstm_shape: tuple[int, int] | None


def _check_lstm(policy: RecurrentActorCriticPolicy) -> tuple[int, int]:
    lstm = policy.lstm_actor
    if not isinstance(lstm, nn.LSTM):
        raise ExportError(f"recurrent policy {type(policy).__name__}: its actor's recurrent "
                          f"layer is a {type(lstm).__name__}; the export handles nn.LSTM only")
    return int(lstm.num_layers), int(lstm.hidden_size)


def policy_graph(policy: ActorCriticPolicy, normalizer: ObsNormalizer | None = None) -> GraphSpec:
    """The exportable greedy actor of ``policy`` (evaluation mode, on the CPU).

    :param policy: a replica-set policy, or SB3's MLP / sb3-contrib's MLP-LSTM policy.
    :param normalizer: the ``VecNormalize`` observation statistics an MLP policy was trained
        with (ignored by the replica-set policies, which scale their inputs themselves).
    """
    policy = policy.to("cpu")
    policy.set_training_mode(False)
    recurrent = isinstance(policy, RecurrentActorCriticPolicy)
    lstm_shape = _check_lstm(policy) if recurrent else None
    state_in = ("lstm_h", "lstm_c") if recurrent else ()
    state_out = ("lstm_h_out", "lstm_c_out") if recurrent else ()
    if isinstance(policy, SET_POLICIES):
        module = RecurrentSetPolicyGraph(policy) if recurrent else SetPolicyGraph(policy)
        inputs: tuple[str, ...] = ("replicas", "request") + state_in
        kind = "replica_set"
    elif isinstance(policy, ActorCriticPolicy) and isinstance(
            policy.pi_features_extractor, FlattenExtractor):
        module = (RecurrentFlatPolicyGraph(policy, normalizer) if recurrent
                  else FlatPolicyGraph(policy, normalizer))
        inputs = ("observation",) + state_in
        kind = "flat"
    else:
        raise ExportError(f"policy class {type(policy).__name__}: the export handles the "
                          "replica-set policies and SB3's MLP / MLP-LSTM policies (flat "
                          "observations, FlattenExtractor)")
    module.eval()
    return GraphSpec(module, kind, recurrent, inputs, ("logits", "probabilities") + state_out,
                     lstm_shape)


def _example_inputs(spec: GraphSpec, sample: dict[str, np.ndarray]) -> tuple[th.Tensor, ...]:
    tensors = [th.as_tensor(sample[name]) for name in spec.inputs if not name.startswith("lstm")]
    if spec.recurrent:
        layers, hidden = spec.lstm_shape  # type: ignore[misc]
        batch = tensors[0].shape[0]
        tensors += [th.zeros(layers, batch, hidden), th.zeros(layers, batch, hidden)]
    return tuple(tensors)


def write_onnx(spec: GraphSpec, sample: dict[str, np.ndarray], path: Path) -> None:
    """Export ``spec.module`` to ``path`` (one self-contained file) with dynamic batch (and, for
    replica-set graphs, replica-count) axes. ``sample`` holds example inputs by name with a
    batch of >= 2 (and >= 2 replicas), so no axis is specialised to 1."""
    args = _example_inputs(spec, sample)
    batch = th.export.Dim("batch", min=1)
    shapes: dict[str, Any] = {}
    for name in spec.inputs:
        if name == "replicas":
            shapes[name] = {0: batch, 1: th.export.Dim("replicas", min=1)}
        elif name.startswith("lstm"):
            shapes[name] = {1: batch}
        else:
            shapes[name] = {0: batch}
    program = th.onnx.export(spec.module, args, dynamo=True, external_data=False,
                             input_names=list(spec.inputs), output_names=list(spec.outputs),
                             dynamic_shapes=shapes, opset_version=OPSET, verbose=False)
    tmp = path.with_name(f".{path.name}.tmp")
    program.save(str(tmp))
    tmp.replace(path)


def compare_with_onnx(spec: GraphSpec, path: Path, sample: dict[str, np.ndarray]
                      ) -> dict[str, float]:
    """Run ``sample`` (one decision per row; recurrent graphs step through the rows as one
    episode) through torch and onnxruntime: the largest probability difference and the share
    of rows whose greedy replica agrees."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rows = len(next(iter(sample.values())))
    state = None
    worst, agree = 0.0, 0
    with th.no_grad():
        for i in range(rows):
            feed = {name: sample[name][i:i + 1] for name in spec.inputs
                    if not name.startswith("lstm")}
            if spec.recurrent:
                if state is None:
                    layers, hidden = spec.lstm_shape  # type: ignore[misc]
                    state = (np.zeros((layers, 1, hidden), np.float32),) * 2
                feed["lstm_h"], feed["lstm_c"] = state
            ours = [o.numpy() for o in spec.module(*[th.as_tensor(v) for v in feed.values()])]
            theirs = session.run(None, feed)
            if spec.recurrent:
                state = (theirs[2], theirs[3])
                worst = max(worst, float(np.abs(ours[2] - theirs[2]).max()))
            worst = max(worst, float(np.abs(ours[1] - theirs[1]).max()))
            agree += int(np.argmax(ours[1]) == np.argmax(theirs[1]))
    return {"rows": rows, "max_abs_probability_diff": worst, "greedy_agreement": agree / rows}


# --------------------------------------------------------------------------- samples
def sample_observations(env_kwargs: dict[str, Any], *, requests: int, seed: int,
                        router: str = "lor") -> tuple[np.ndarray, Any]:
    """``requests`` consecutive observations of the environment ``env_kwargs`` routed by a
    heuristic, and the environment's observation layout."""
    from llm_cluster_env.env.cluster_env import LLMClusterEnv
    from llm_cluster_env.routing.heuristics import make_router

    kwargs = dict(env_kwargs)
    kwargs["episode_requests"] = requests + 1
    env = LLMClusterEnv(**kwargs)
    obs, _ = env.reset(seed=seed)
    heuristic = make_router(router)
    heuristic.reset(env.num_replicas, np.random.default_rng(seed))
    rows = [obs]
    for _ in range(requests - 1):
        obs, *_ = env.step(heuristic.select(env.view))
        rows.append(obs)
    return np.asarray(rows, dtype=np.float32), env.layout


def graph_inputs(spec: GraphSpec, observations: np.ndarray, layout) -> dict[str, np.ndarray]:
    """Graph inputs for flat observations: replica rows (present replicas only) and tail for a
    replica-set graph, the observation itself for a flat one."""
    if spec.kind == "flat":
        return {"observation": observations.astype(np.float32)}
    per = layout.num_replica_features
    block = observations[:, : layout.replica_block].reshape(len(observations), layout.num_slots,
                                                            per)
    block = block[:, : layout.num_replicas]
    tail = observations[:, layout.replica_block:layout.history_offset]
    return {"replicas": np.ascontiguousarray(block, dtype=np.float32),
            "request": np.ascontiguousarray(tail, dtype=np.float32)}


# --------------------------------------------------------------------------- schema
#: Prompt tokens of the prefill chunk the reference prefill throughput is timed at.
PREFILL_REFERENCE_TOKENS = 2048


def _hardware_table(env_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The simulator's static per-replica features for every GPU it has coefficients for, for
    the training cluster's model(s): reference values a deployment can use for its own
    endpoints (``speed_k``, ``kv_capacity_k``, and ``prefill_tokens_per_s``: a 2,048-token
    prefill chunk alone, for the adapter's engine-model approximation)."""
    from dataclasses import replace

    from llm_cluster_env.env.cluster_env import LLMClusterEnv
    from llm_cluster_env.env.observation import reference_decode_throughput
    from llm_cluster_env.sim.latency import IterationTimeModel

    env = LLMClusterEnv(**dict(env_kwargs, episode_requests=2))
    trained = {(c.gpu, c.model, c.tensor_parallel) for c in env.config.replica_configs}
    rows = []
    for base in {c.model: c for c in env.config.replica_configs}.values():
        for model, gpu, tp in IterationTimeModel.available():
            if model != base.model:
                continue
            config = replace(base, gpu=gpu, tensor_parallel=tp, num_kv_blocks=None)
            try:
                blocks = config.kv_cache_blocks
            except ValueError:  # the model does not fit that GPU
                continue
            latency = IterationTimeModel.for_replica(model, gpu, tp)
            chunk = latency.iteration_time(0, 0, [(PREFILL_REFERENCE_TOKENS, 0)])
            rows.append({"gpu": gpu, "model": model, "tensor_parallel": tp,
                         "in_training_cluster": (gpu, model, tp) in trained,
                         "speed_k": reference_decode_throughput(latency) / 1000.0,
                         "kv_capacity_k": blocks * config.block_size / 1000.0,
                         "prefill_tokens_per_s": PREFILL_REFERENCE_TOKENS / chunk})
    return rows


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "stable-baselines3", "sb3-contrib", "onnx", "onnxruntime",
                 "llm-cluster-rl", "numpy"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_schema(spec: GraphSpec, layout, *, source: str, hardware: list[dict[str, Any]],
                 check: dict[str, float], onnx_path: Path, temperature: float,
                 fixed_replicas: int | None) -> dict[str, Any]:
    """The ``schema.json`` of an export (see the module docs)."""
    from llm_cluster_env.deploy.feature_catalog import deployment_schema

    features = deployment_schema(layout)
    per = len(features["replica_features"])
    tail = len(features["request_features"])
    tensors: dict[str, Any] = {}
    if spec.kind == "replica_set":
        tensors["replicas"] = {"dtype": "float32", "shape": ["batch", "N", per],
                               "meaning": "one row per replica, columns replica_features"}
        tensors["request"] = {"dtype": "float32", "shape": ["batch", tail],
                              "meaning": "request_features, in order"}
        replica_count = {
            "mode": "dynamic",
            "text": "N is a dynamic axis: pass one row per replica present (any N >= 1). "
                    "Every row needs speed_k > 0 (a row of zeros is an empty slot and is "
                    "masked). Replica order does not matter: permuting the rows permutes "
                    "the outputs. dispatch_share is scaled by N and arrival_rate divided by "
                    "N inside the graph.",
        }
    else:
        width = int(np.prod(spec.module.policy.observation_space.shape))
        tensors["observation"] = {
            "dtype": "float32", "shape": ["batch", width],
            "meaning": "the flat observation: replica_features of replica 0, then replica "
                       "1, ..., then request_features, then (history_window > 0) one-hot "
                       "recent decisions hist/t-1/r0.. (t-1 first); raw values: VecNormalize "
                       "is folded into the graph"}
        replica_count = {"mode": "fixed", "replicas": fixed_replicas,
                         "text": f"exactly {fixed_replicas} replicas, in the order the "
                                 "policy was trained on; another count needs retraining"}
    outputs: dict[str, Any] = {
        "logits": {"dtype": "float32", "shape": ["batch", "N"],
                   "meaning": "per-replica scores at temperature 1 (absent slots -1e9)"},
        "probabilities": {"dtype": "float32", "shape": ["batch", "N"],
                          "meaning": "softmax(logits); the greedy router takes the argmax"},
    }
    if spec.recurrent:
        layers, hidden = spec.lstm_shape  # type: ignore[misc]
        for name in ("lstm_h", "lstm_c"):
            tensors[name] = {"dtype": "float32", "shape": [layers, "batch", hidden],
                             "meaning": "LSTM state before this decision (zeros at the "
                                        "start of an episode)"}
            outputs[f"{name}_out"] = {"dtype": "float32", "shape": [layers, "batch", hidden],
                                      "meaning": "LSTM state after it: feed it back"}
    return {
        "format": SCHEMA_FORMAT,
        "format_version": SCHEMA_VERSION,
        "policy": {"kind": spec.kind, "recurrent": spec.recurrent,
                   "class": type(spec.module).__name__, "sampling_temperature": temperature,
                   "lstm": ({"layers": spec.lstm_shape[0], "hidden": spec.lstm_shape[1]}
                            if spec.recurrent else None)},
        "replica_count": replica_count,
        **features,
        "inputs": {name: tensors[name] for name in spec.inputs},
        "outputs": {name: outputs[name] for name in spec.outputs},
        "onnx": {"file": onnx_path.name, "opset": OPSET, "sha256": _sha256(onnx_path)},
        "reference_hardware": hardware,
        "export_check": check,
        "provenance": {"source": source, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                       time.gmtime()),
                       "versions": _versions()},
    }


# --------------------------------------------------------------------------- SB3 artefacts
_POLICY_MODULES = ("recurrent", "replica_set")


def write_sb3_loader(out: Path) -> Path:
    """Write ``out/router_policies/``: this project's policy classes with their imports made
    package-relative, so torch + SB3 + sb3-contrib (+ numpy, gymnasium) are all they need, and
    a ``custom_objects(zip_path)`` that maps a saved model's classes to them."""
    package = out / "router_policies"
    package.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent.parent / "policies"
    for name in _POLICY_MODULES:
        text = (here / f"{name}.py").read_text()
        text = re.sub(r"\bfrom sb3_warmstart\.policies\.(\w+) import", r"from .\1 import", text)
        leftover = re.findall(r"^\s*(?:from|import) (?:sb3_warmstart|llm_cluster_env)\b.*$",
                              text, flags=re.M)
        if leftover:
            raise ExportError(f"sb3_warmstart/{name}.py imports {leftover}: the stand-alone "
                              "policy package must need only torch and SB3")
        (package / f"{name}.py").write_text(text)
    (package / "__init__.py").write_text(_LOADER_INIT)
    return package


_LOADER_INIT = '''"""The router's policy classes for stock Stable-Baselines3 (torch + SB3 + sb3-contrib).

A model saved by llm-cluster-rl's training refers to its classes by their module in that
project; ``custom_objects(path)`` replaces them by the classes of this package (same weights,
same forward) and drops the training-only settings stock SB3 cannot read::

    from stable_baselines3 import PPO            # or: from sb3_contrib import RecurrentPPO
    from router_policies import custom_objects

    model = PPO.load("final_model.zip", custom_objects=custom_objects("final_model.zip"))
    action, _ = model.predict(obs, deterministic=True)

Generated by train/export.py from sb3_warmstart/policies/recurrent.py and replica_set.py.
"""

import base64
import json
import pickletools
import zipfile

from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy

from .replica_set import RecurrentReplicaSetPolicy, ReplicaSetPolicy

#: Saved policy class name -> the class to load it with.
POLICY_CLASSES = {
    "ReplicaSetPolicy": ReplicaSetPolicy,
    "RecurrentReplicaSetPolicy": RecurrentReplicaSetPolicy,
    "TemperatureMlpPolicy": ActorCriticPolicy,          # same parameters as SB3's MlpPolicy
    "TemperatureMlpLstmPolicy": RecurrentActorCriticPolicy,  # sb3-contrib's MlpLstmPolicy
}
_PROJECT_MODULES = ("sb3_warmstart", "llm_cluster_env")


def _class_name(serialized):
    """The name of a class pickled by reference (read from the pickle's opcodes, nothing is
    unpickled): the string after the project module's name."""
    strings = [arg for _, arg, _ in pickletools.genops(base64.b64decode(serialized))
               if isinstance(arg, str)]
    for module, name in zip(strings, strings[1:]):
        if module.split(".")[0] in _PROJECT_MODULES:
            return name
    return None


def custom_objects(path):
    """``custom_objects`` for ``PPO.load``/``RecurrentPPO.load`` of the model zip at ``path``:
    its policy class mapped by :data:`POLICY_CLASSES`, every other value that only this
    project can unpickle (training configuration) replaced by ``None``."""
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    out = {}
    for key, item in data.items():
        if not (isinstance(item, dict) and ":serialized:" in item):
            continue
        described = " ".join(str(item.get(k, "")) for k in (":type:", "__module__"))
        if not any(module in described for module in _PROJECT_MODULES):
            continue
        if key == "policy_class":
            name = _class_name(item[":serialized:"])
            if name not in POLICY_CLASSES:
                raise ValueError(f"{path}: policy class {name!r} ({described}) is not one of "
                                 f"{sorted(POLICY_CLASSES)}")
            out[key] = POLICY_CLASSES[name]
        else:
            out[key] = None
    return out
'''


def write_sb3_artefacts(out: Path, *, obs_normalizer_json: dict[str, Any] | None,
                        model_files: Sequence[Path]) -> None:
    """``out/sb3/``: the stand-alone policy package, the normaliser statistics as JSON and a
    README with the loading recipe for ``model_files``."""
    sb3 = out / "sb3"
    sb3.mkdir(parents=True, exist_ok=True)
    write_sb3_loader(sb3)
    if obs_normalizer_json is not None:
        atomic_write_json(sb3 / "vecnormalize.json", obs_normalizer_json)
    listed = "\n".join(f"- `{p}`" for p in model_files)
    (sb3 / "README.md").write_text(_SB3_README.format(models=listed))


_SB3_README = """# Loading the trained model with stock Stable-Baselines3

Needs only `torch`, `stable-baselines3` (and `sb3-contrib` for recurrent models), not this
project. The models of the run:

{models}

```python
import sys
sys.path.insert(0, "path/to/this/sb3")      # the folder holding router_policies/
from router_policies import custom_objects
from stable_baselines3 import PPO           # a recurrent run: from sb3_contrib import RecurrentPPO

path = "final_model.zip"                    # or checkpoints/step_<n>/model.zip
model = PPO.load(path, custom_objects=custom_objects(path), device="cpu")
```

`vecnormalize.json` holds the observation statistics the policy acts with (`obs_rms.mean`,
`obs_rms.var`, `clip_obs`, `epsilon`; `norm_obs: false` for the replica-set policies, which
scale their inputs inside the network); the run folder's `final_vecnormalize.json` and each
checkpoint's `vecnormalize.json` hold the whole `VecNormalize` (reward statistics too). An MLP policy acts on
`clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)`, as `VecNormalize` computes.
"""


# --------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_router` wrote and checked."""

    out: Path
    schema: dict[str, Any]


def _runtime_sources() -> list[Path]:
    import llm_cluster_env

    root = Path(llm_cluster_env.__file__).resolve().parent
    return [root / "deploy" / "router_runtime.py", root / "deploy" / "vllm_router_adapter.py"]


def export_router(source: str | Path, out: str | Path, *, sample_requests: int = 256,
                  seed: int = 10_000, tolerance: float = 1e-4) -> ExportResult:
    """Export the policy of ``source`` (a run folder, a checkpoint directory or a policy zip)
    into ``out`` (see the module docs and :func:`export_policy`)."""
    from sb3_warmstart.common.checkpoint import STATE_FILE
    from sb3_warmstart.policies.io import load_policy

    source, out = Path(source), Path(out)
    if not source.exists():
        raise ExportError(f"{source}: no such run folder, checkpoint or policy file")
    if source.is_dir() and not (source / "final_model.zip").is_file() and not (
            source / STATE_FILE).is_file():
        found = sorted(p.name for p in source.iterdir())[:12]
        raise ExportError(f"{source}: no final_model.zip (the run has not finished: export "
                          f"one of its checkpoints, {source}/checkpoints/step_<n>) and no "
                          f"{STATE_FILE} (not a checkpoint either); it holds {found}")
    if source.is_file() and source.suffix != ".zip":
        raise ExportError(f"{source}: not a run folder, checkpoint directory or policy zip")
    model, obs_rms, env_kwargs, _, label = load_policy(source)
    if source.is_dir() and (source / "final_model.zip").is_file():
        models = [source / "final_model.zip"]
        models += sorted((source / "checkpoints").glob("step_*/model.zip"))
    elif source.is_dir():
        models = [source / "model.zip"]
    else:
        models = [source]
    return export_policy(model.policy, obs_rms, env_kwargs, out, label=label,
                         source=str(source.resolve()), model_files=models,
                         sample_requests=sample_requests, seed=seed, tolerance=tolerance)


def export_policy(policy: ActorCriticPolicy, obs_rms: Any, env_kwargs: dict[str, Any],
                  out: str | Path, *, label: str, source: str,
                  model_files: Sequence[Path] = (), sample_requests: int = 256,
                  seed: int = 10_000, tolerance: float = 1e-4) -> ExportResult:
    """Export ``policy`` (trained on the environment ``env_kwargs``, with the observation
    statistics ``obs_rms`` for an MLP policy) into ``out``. The ONNX graph is checked against
    the torch policy on ``sample_requests`` observations of that environment (seeded
    ``seed``); a probability difference above ``tolerance`` or a greedy disagreement fails the
    export. Files are written into a temporary sibling folder moved into place at the end, so
    a failed export leaves an earlier one untouched."""
    out = Path(out)
    th.set_num_threads(1)
    set_policy = isinstance(policy, SET_POLICIES)
    normalizer = None
    if not set_policy and obs_rms is not None:
        normalizer = obs_rms if isinstance(obs_rms, ObsNormalizer) else ObsNormalizer(obs_rms)
    spec = policy_graph(policy, normalizer)
    observations, layout = sample_observations(env_kwargs, requests=sample_requests, seed=seed)
    if set_policy:
        policy.check_schema(layout.replica_features,
                            layout.names[layout.replica_block:layout.history_offset])
    elif observations.shape[1:] != tuple(policy.observation_space.shape):
        raise ExportError(f"{source}: the policy expects observations of shape "
                          f"{tuple(policy.observation_space.shape)}, its training environment "
                          f"{env_kwargs} gives {observations.shape[1:]}")
    sample = graph_inputs(spec, observations, layout)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{time.monotonic_ns()}")
    tmp.mkdir()
    try:
        onnx_path = tmp / ONNX_FILE
        write_onnx(spec, {k: v[:2] for k, v in sample.items()}, onnx_path)
        check = compare_with_onnx(spec, onnx_path, sample)
        check["sample"] = (f"{sample_requests} consecutive decisions of the training "
                           f"environment under lor, seed {seed}")
        if check["max_abs_probability_diff"] > tolerance or check["greedy_agreement"] < 1.0:
            raise ExportError(f"the ONNX graph does not reproduce the policy: {check}")
        schema = build_schema(
            spec, layout, source=source, hardware=_hardware_table(env_kwargs), check=check,
            onnx_path=onnx_path, temperature=float(getattr(policy, "temperature", 1.0)),
            fixed_replicas=None if set_policy else int(policy.action_space.n))
        schema["provenance"]["label"] = label
        schema["provenance"]["env_kwargs"] = env_kwargs
        atomic_write_json(tmp / SCHEMA_FILE, schema)
        for file in _runtime_sources():
            shutil.copy2(file, tmp / file.name)
        norm_json: dict[str, Any] = {"format": "vecnormalize/json", "format_version": 1,
                                     "norm_obs": normalizer is not None}
        if normalizer is not None:
            stats = normalizer.to_dict()
            norm_json.update(clip_obs=stats["clip_obs"], epsilon=stats["epsilon"],
                             obs_rms={k: stats[k] for k in ("mean", "var", "count")})
        write_sb3_artefacts(tmp, obs_normalizer_json=norm_json, model_files=model_files)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{time.monotonic_ns()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, schema)


__all__ = ["ExportError", "ExportResult", "FlatPolicyGraph", "GraphSpec",
           "RecurrentFlatPolicyGraph", "RecurrentSetPolicyGraph", "SetPolicyGraph",
           "compare_with_onnx", "export_policy", "export_router", "graph_inputs", "policy_graph",
           "sample_observations", "write_onnx", "write_sb3_loader"]
