"""Route with an exported policy: per-replica engine stats plus a request in, a replica out.

Depends on numpy and onnxruntime only (imported when a router is loaded), so a deployment can
copy this one file next to the ``policy.onnx`` and ``schema.json`` that ``train/export.py``
writes (the export folder already holds a copy)::

    from router_runtime import ExportedRouter

    router = ExportedRouter.load("export/")            # one onnxruntime thread by default
    router.reset()                                     # start of an episode (recurrent state)
    replica = router.route(
        replicas=[{"queued": 2, "running": 31, "kv_usage": 0.41, ...},   # one mapping per
                  {"queued": 0, "running": 12, "kv_usage": 0.18, ...}],  # replica, every
        request={"req/prompt_tokens_k": 1.2, "global/arrival_rate": 13.9})  # schema feature

``replicas`` may also be a float array ``(N, F)`` whose ``columns`` are given (they must be the
schema's ``replica_features`` in order). Values are the units of ``schema.json`` (the feature
table of :mod:`llm_cluster_env.env.observation`): finite and >= 0 (the engine-model estimates
``est_*`` finite of either sign), ``speed_k`` > 0 for every replica. A replica-set policy routes any number of replicas; a flat (MLP) policy exactly the
number it was trained on, in the same order. Bad input raises :class:`RouterInputError` naming
the replica, the feature and the value. The decision-history features of a flat policy trained
with ``history_window > 0`` are the router's own last decisions, kept here.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_FORMAT = "llm-cluster-rl/router-export"
SUPPORTED_VERSIONS = (1,)
SCHEMA_FILE = "schema.json"


class RouterInputError(ValueError):
    """Stats or a request the exported router cannot route on (missing or unknown features, a
    different replica schema, wrong shapes, values out of range)."""


class ExportFormatError(RuntimeError):
    """An export folder that is incomplete, of another format, or whose model does not match
    its schema."""


@dataclass(frozen=True)
class Decision:
    """One routing decision: the replica index and the policy's outputs for every replica."""

    replica: int
    probabilities: np.ndarray
    logits: np.ndarray


def _names(entries: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(str(e["name"]) for e in entries)


class ExportedRouter:
    """An exported policy behind ``route(replicas, request) -> replica``.

    :param schema: the export's ``schema.json`` (parsed).
    :param model_path: the ONNX file.
    :param num_threads: onnxruntime intra- and inter-op threads.
    :param deterministic: take the most probable replica (default), else sample with ``rng``.
    :param rng: the generator sampled decisions draw from.
    """

    def __init__(self, schema: Mapping[str, Any], model_path: str | Path, *,
                 num_threads: int = 1, deterministic: bool = True,
                 rng: np.random.Generator | None = None) -> None:
        if schema.get("format") != SCHEMA_FORMAT or \
                schema.get("format_version") not in SUPPORTED_VERSIONS:
            raise ExportFormatError(
                f"schema format {schema.get('format')!r} version "
                f"{schema.get('format_version')!r}: expected {SCHEMA_FORMAT!r} version in "
                f"{SUPPORTED_VERSIONS}")
        import onnxruntime as ort

        self.schema = dict(schema)
        self.replica_features: tuple[str, ...] = _names(schema["replica_features"])
        self.request_features: tuple[str, ...] = _names(
            [e for e in schema["request_features"]])
        self.kind: str = schema["policy"]["kind"]
        self.recurrent: bool = bool(schema["policy"]["recurrent"])
        count = schema["replica_count"]
        #: The replica count a flat policy needs (``None``: any).
        self.fixed_replicas: int | None = count.get("replicas") if count["mode"] == "fixed" \
            else None
        self.history_window = int(schema.get("history_window", 0))
        self._column = {name: i for i, name in enumerate(self.replica_features)}
        self._presence = self._column.get("speed_k")
        if self._presence is None:
            raise ExportFormatError("schema: the per-replica features lack speed_k (presence)")
        #: Columns that may be negative: the engine-model estimates, which a deployment
        #: approximates its own way (the simulator's are >= 0; a replica-set policy reads every
        #: feature clamped at 0, so a negative estimate reads as 0).
        self._signed = np.array([e.get("source") == "engine_model"
                                 for e in schema["replica_features"]])
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = num_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model_path), options,
                                            providers=["CPUExecutionProvider"])
        expected = list(schema["inputs"])
        actual = [i.name for i in self.session.get_inputs()]
        if actual != expected:
            raise ExportFormatError(f"{model_path}: the model's inputs {actual} differ from "
                                    f"the schema's {expected}")
        self._outputs = list(schema["outputs"])
        if self.recurrent:
            lstm = schema["policy"]["lstm"]
            self._state_shape = (int(lstm["layers"]), 1, int(lstm["hidden"]))
        self.deterministic = bool(deterministic)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.reset()

    @classmethod
    def load(cls, export_dir: str | Path, **kwargs: Any) -> ExportedRouter:
        """The router of an export folder (``schema.json`` and the ONNX file it names)."""
        folder = Path(export_dir)
        schema_path = folder / SCHEMA_FILE
        if not schema_path.is_file():
            raise ExportFormatError(f"{folder}: no {SCHEMA_FILE} (not an export folder)")
        schema = json.loads(schema_path.read_text())
        model_path = folder / schema.get("onnx", {}).get("file", "policy.onnx")
        if not model_path.is_file():
            raise ExportFormatError(f"{folder}: {model_path.name} is missing")
        return cls(schema, model_path, **kwargs)

    # ------------------------------------------------------------------ state
    def reset(self, rng: np.random.Generator | None = None) -> None:
        """Start an episode: zero the recurrent state and forget the decision history."""
        if rng is not None:
            self.rng = rng
        if self.recurrent:
            zeros = np.zeros(self._state_shape, dtype=np.float32)
            self._state = (zeros, zeros.copy())
        self._history: deque[int] = deque(maxlen=max(self.history_window, 1))

    # ------------------------------------------------------------------ inputs
    def replica_matrix(self, replicas: Sequence[Mapping[str, float]] | np.ndarray,
                       columns: Sequence[str] | None = None) -> np.ndarray:
        """The validated ``(N, F)`` float32 matrix of per-replica stats (see the module
        docs); :class:`RouterInputError` naming what is wrong."""
        if isinstance(replicas, np.ndarray):
            matrix = self._from_array(replicas, columns)
        else:
            if columns is not None:
                raise RouterInputError("columns: only for an array of replica stats")
            matrix = self._from_mappings(replicas)
        self._check_values(matrix)
        return matrix

    def _from_array(self, replicas: np.ndarray, columns: Sequence[str] | None) -> np.ndarray:
        if columns is None:
            raise RouterInputError(
                f"replicas: an array needs columns= naming its {replicas.shape[-1]} columns "
                f"(the policy's per-replica features: {list(self.replica_features)})")
        if columns is not self.replica_features and tuple(columns) != self.replica_features:
            columns = tuple(columns)
            self._schema_difference(columns)
        if replicas.ndim != 2 or replicas.shape[1] != len(self.replica_features):
            raise RouterInputError(f"replicas: shape {replicas.shape}, expected (N, "
                                   f"{len(self.replica_features)}) for columns "
                                   f"{list(self.replica_features)}")
        return np.ascontiguousarray(replicas, dtype=np.float32)

    def _schema_difference(self, columns: tuple[str, ...]) -> None:
        missing = [f for f in self.replica_features if f not in columns]
        unknown = [f for f in columns if f not in self._column]
        if missing or unknown:
            raise RouterInputError(
                f"replica stats have another schema: missing {missing}, unknown {unknown} "
                f"(the policy's per-replica features: {list(self.replica_features)})")
        index = next(i for i, (a, b) in enumerate(zip(columns, self.replica_features))
                     if a != b)
        raise RouterInputError(f"replica stats: column {index} is {columns[index]!r}, the "
                               f"policy expects {self.replica_features[index]!r} (order: "
                               f"{list(self.replica_features)})")

    def _from_mappings(self, replicas: Sequence[Mapping[str, float]]) -> np.ndarray:
        n = len(replicas)
        if n == 0:
            raise RouterInputError("replicas: no replica to route to")
        features = self.replica_features
        matrix = np.empty((n, len(features)), dtype=np.float32)
        for i, stats in enumerate(replicas):
            try:
                matrix[i] = [stats[f] for f in features]
            except KeyError:
                missing = [f for f in features if f not in stats]
                raise RouterInputError(
                    f"replica {i}: missing feature(s) {missing} (the policy's per-replica "
                    f"features: {list(features)})") from None
            except (TypeError, ValueError) as err:
                bad = next((f for f in features if not _is_number(stats[f])), None)
                raise RouterInputError(f"replica {i}: feature {bad!r}={stats.get(bad)!r}: "
                                       "not a number") from err
            if len(stats) != len(features):
                unknown = sorted(set(stats) - set(features))
                raise RouterInputError(
                    f"replica {i}: unknown feature(s) {unknown}: the stats have another "
                    f"schema than the policy's per-replica features {list(features)}")
        return matrix

    def _check_values(self, matrix: np.ndarray) -> None:
        n = matrix.shape[0]
        if n == 0:
            raise RouterInputError("replicas: no replica to route to")
        if self.fixed_replicas is not None and n != self.fixed_replicas:
            raise RouterInputError(f"replicas: {n} given, this (flat) policy routes exactly "
                                   f"{self.fixed_replicas}")
        # fast path (three reductions): all >= 0 (NaN fails it), the sum finite (no inf), every
        # replica present; the slow path allows negative engine-model estimates and otherwise
        # finds and names the culprit
        if not (matrix.min() >= 0 and math.isfinite(matrix.sum())
                and matrix[:, self._presence].min() > 0):
            finite = np.isfinite(matrix)
            bad = ~finite | ((matrix < 0) & ~self._signed)
            if bad.any():
                i, j = np.argwhere(bad)[0]
                rule = "finite" if self._signed[j] else "finite and >= 0"
                raise RouterInputError(f"replica {i}: {self.replica_features[j]}="
                                       f"{float(matrix[i, j])!r}: must be {rule}")
            if matrix[:, self._presence].min() <= 0:
                i = int(np.argmin(matrix[:, self._presence] > 0))
                raise RouterInputError(
                    f"replica {i}: speed_k={float(matrix[i, self._presence])!r}: must be > 0 "
                    "(a replica with speed_k 0 reads as an empty slot)")

    def request_vector(self, request: Mapping[str, float]) -> np.ndarray:
        """The validated request/global features, float32 ``(T,)``."""
        try:
            values = [float(request[f]) for f in self.request_features]
        except KeyError:
            missing = [f for f in self.request_features if f not in request]
            raise RouterInputError(f"request: missing feature(s) {missing} (expected "
                                   f"{list(self.request_features)})") from None
        except (TypeError, ValueError):
            bad = next(f for f in self.request_features if not _is_number(request[f]))
            raise RouterInputError(f"request: {bad}={request[bad]!r}: not a number") from None
        if len(request) != len(values):
            unknown = sorted(set(request) - set(self.request_features))
            raise RouterInputError(f"request: unknown feature(s) {unknown} (expected "
                                   f"{list(self.request_features)})")
        for name, value in zip(self.request_features, values):
            if not (value >= 0.0 and math.isfinite(value)):
                raise RouterInputError(f"request: {name}={value!r}: must be finite and >= 0")
        return np.asarray(values, dtype=np.float32)

    # ------------------------------------------------------------------ routing
    def decide(self, replicas: Sequence[Mapping[str, float]] | np.ndarray,
               request: Mapping[str, float], *, columns: Sequence[str] | None = None
               ) -> Decision:
        """Route one request (see :meth:`route`) and return the policy's outputs too."""
        matrix = self.replica_matrix(replicas, columns)
        tail = self.request_vector(request)
        if self.kind == "replica_set":
            feed = {"replicas": matrix[None], "request": tail[None]}
        else:
            feed = {"observation": self._flat(matrix, tail)[None]}
        if self.recurrent:
            feed["lstm_h"], feed["lstm_c"] = self._state
        outputs = self.session.run(self._outputs, feed)
        logits, probs = outputs[0][0], outputs[1][0]
        if self.recurrent:
            self._state = (outputs[2], outputs[3])
        if self.deterministic:
            replica = int(np.argmax(probs))
        else:
            p = probs.astype(np.float64)
            replica = int(self.rng.choice(len(p), p=p / p.sum()))
        self._history.appendleft(replica)
        return Decision(replica, probs, logits)

    def route(self, replicas: Sequence[Mapping[str, float]] | np.ndarray,
              request: Mapping[str, float], *, columns: Sequence[str] | None = None) -> int:
        """The index (into ``replicas``) of the replica for ``request``.

        :param replicas: one mapping ``feature -> value`` per replica, or an ``(N, F)`` array
            with ``columns``.
        :param request: the request/global features by name (``schema.json``
            ``request_features``).
        """
        return self.decide(replicas, request, columns=columns).replica

    def _flat(self, matrix: np.ndarray, tail: np.ndarray) -> np.ndarray:
        parts = [matrix.reshape(-1), tail]
        if self.history_window:
            n = matrix.shape[0]
            history = np.zeros((self.history_window, n), dtype=np.float32)
            for k, replica in enumerate(self._history):
                history[k, replica] = 1.0
            parts.append(history.reshape(-1))
        return np.concatenate(parts).astype(np.float32, copy=False)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


__all__ = ["Decision", "ExportFormatError", "ExportedRouter", "RouterInputError"]
