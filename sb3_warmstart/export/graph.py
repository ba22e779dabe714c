"""The exportable greedy actor of a policy, its ONNX file and the ONNX-vs-torch check.

:func:`policy_graph` wraps a trained policy in an ``nn.Module`` whose inputs are what a
deployment has (raw features, LSTM state) and whose outputs are ``logits`` and
``probabilities`` ``[batch, N]``: replica-set policies
(:mod:`sb3_warmstart.policies.replica_set`) take ``replicas: float32[batch, N, F]`` (``N`` a
dynamic axis) and ``request: float32[batch, T]``, their scaling being buffers of the network
already; SB3's MLP policies take the flat ``observation: float32[batch, D]`` with
``VecNormalize``'s mean, variance, epsilon and clip folded in (in float64, as ``VecNormalize``
computes). Recurrent graphs also take ``lstm_h``/``lstm_c`` ``[layers, batch, hidden]`` and
return ``lstm_h_out``/``lstm_c_out``. :func:`write_onnx` writes the graph (needs the ``deploy``
extra: onnx, onnxscript); :func:`compare_with_onnx` runs it in onnxruntime beside torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn

from sb3_warmstart.common.normalize import ObsNormalizer
from sb3_warmstart.export.errors import ExportError
from sb3_warmstart.policies.replica_set import SET_POLICIES

#: ONNX opset of the exported graph.
OPSET = 18


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


__all__ = ["OPSET", "FlatPolicyGraph", "GraphSpec", "RecurrentFlatPolicyGraph",
           "RecurrentSetPolicyGraph", "SetPolicyGraph", "compare_with_onnx", "policy_graph",
           "write_onnx"]
