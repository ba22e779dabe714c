"""``schema.json`` of an export: the features in order with units and sources, the tensors,
the replica-count rule, reference hardware, the export check and provenance.

The reference hardware (:func:`reference_hardware`) is read through the environment: for each
GPU and tensor-parallel degree the simulator has a latency model of, a one-replica
:class:`~llm_cluster_env.env.cluster_env.LLMClusterEnv` of the training cluster's model is
built and its replica's static features are taken as the observation computes them. Nothing
here imports the simulator package (``llm_cluster_env.sim``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sb3_warmstart.export.graph import OPSET, GraphSpec
from sb3_warmstart.policies.policy_file import library_versions

#: Packages whose versions the schema's provenance records.
EXPORT_VERSIONED_PACKAGES = ("torch", "stable-baselines3", "sb3-contrib", "onnx", "onnxruntime",
                             "llm-cluster-rl", "numpy")

SCHEMA_FORMAT = "llm-cluster-rl/router-export"
SCHEMA_VERSION = 1

#: Prompt tokens of the prefill chunk the reference prefill throughput is timed at.
PREFILL_REFERENCE_TOKENS = 2048
#: Tensor-parallel degrees a replica may use (:class:`llm_cluster_env.config.ReplicaConfig`).
TENSOR_PARALLEL_DEGREES = (1, 2, 4, 8)


def reference_hardware(env_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The static per-replica features of the training cluster's model(s) on every GPU and
    tensor-parallel degree the simulator has a latency model for: reference values a
    deployment can use for its own endpoints. Per row: ``speed_k`` (decode throughput at the
    reference batch, 1k tokens/s), ``kv_capacity_k`` (KV-cache capacity, 1k tokens) and
    ``prefill_tokens_per_s`` (a 2,048-token prefill chunk alone, tokens/s, for the adapter's
    engine-model approximation); ``in_training_cluster`` marks the trained combinations.

    :param env_kwargs: the training environment's keyword arguments.
    """
    from llm_cluster_env.config import ConfigError, EnvConfig
    from llm_cluster_env.env.cluster_env import LLMClusterEnv
    from llm_cluster_env.env.observation import reference_decode_throughput
    from llm_cluster_env.hardware import GPUS

    trained_config = LLMClusterEnv(**dict(env_kwargs, episode_requests=1)).config
    trained = {(c.gpu, c.model, c.tensor_parallel) for c in trained_config.replica_configs}
    rows = []
    for base in {c.model: c for c in trained_config.replica_configs}.values():
        for gpu in sorted(GPUS):
            for tp in TENSOR_PARALLEL_DEGREES:
                try:  # ConfigError: the model does not fit that GPU
                    config = replace(base, gpu=gpu, tensor_parallel=tp, num_kv_blocks=None)
                except ConfigError:
                    continue
                try:  # ValueError: the simulator has no latency model of this combination
                    env = LLMClusterEnv(config=EnvConfig(replicas=(config,),
                                                         episode_requests=1))
                except ValueError as err:
                    if "no latency coefficients" not in str(err):
                        raise
                    continue
                replica = env.cluster.replicas[0]
                chunk = replica.latency.iteration_time(0, 0, [(PREFILL_REFERENCE_TOKENS, 0)])
                rows.append({"gpu": gpu, "model": base.model, "tensor_parallel": tp,
                             "in_training_cluster": (gpu, base.model, tp) in trained,
                             "speed_k": reference_decode_throughput(replica.latency) / 1000.0,
                             "kv_capacity_k": replica.num_blocks * replica.block_size / 1000.0,
                             "prefill_tokens_per_s": PREFILL_REFERENCE_TOKENS / chunk})
    return rows


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
                       "versions": library_versions(EXPORT_VERSIONED_PACKAGES)},
    }


__all__ = ["PREFILL_REFERENCE_TOKENS", "SCHEMA_FORMAT", "SCHEMA_VERSION", "build_schema",
           "reference_hardware"]
