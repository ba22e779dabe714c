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

``replicas`` may also be a numeric array ``(N, F)`` whose ``columns`` are given (they must be
the schema's ``replica_features`` in order). Values are the units of ``schema.json`` (the
feature table of :mod:`llm_cluster_env.env.observation`): real numbers (``int``/``float`` or
numpy numbers; ``bool``, strings and ``None`` are refused, not converted), finite and >= 0
(the engine-model estimates ``est_*`` finite of either sign), at most 1 for the features whose
unit is ``fraction`` (``kv_usage``, ``dispatch_share``, ...), ``speed_k`` > 0 for every
replica. A replica-set policy routes any number of replicas; a flat (MLP) policy exactly the
number it was trained on, in the same order. Bad input raises :class:`RouterInputError` naming
the replica (and its endpoint id, when ``ids`` are given), the feature and the value. The
decision-history features of a flat policy trained with ``history_window > 0`` are the
router's own last decisions, kept here.

Loading checks the folder before the first request: a ``schema.json`` that is not JSON or
lacks a field, a ``policy.onnx`` that is damaged (its SHA-256 differs from the one the schema
records, or onnxruntime cannot parse it), and a model whose input names, shapes or feature
counts disagree with the schema each raise one :class:`ExportFormatError` naming the file(s)
and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_FORMAT = "llm-cluster-rl/router-export"
SUPPORTED_VERSIONS = (1,)
SCHEMA_FILE = "schema.json"
POLICY_KINDS = ("flat", "replica_set")
OUTPUTS = ("logits", "probabilities")
STATE_OUTPUTS = ("lstm_h_out", "lstm_c_out")
#: The unit (``schema.json``) of features that must lie in [0, 1].
FRACTION_UNIT = "fraction"
_PLAIN_NUMBERS = frozenset((float, int))  # exact types: bool (an int subclass) is not one
_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RouterInputError(ValueError):
    """Stats or a request the exported router cannot route on (missing or unknown features, a
    different replica schema, wrong shapes or types, values out of range).

    :param replica: index of the offending replica (``None``: not about one replica).
    :param feature: name of the offending feature, when there is one.
    :param part: ``"replicas"`` or ``"request"``: which input the error is about.
    """

    def __init__(self, message: str, *, replica: int | None = None, feature: str | None = None,
                 part: str | None = None) -> None:
        super().__init__(message)
        self.replica = replica
        self.feature = feature
        self.part = part


class ExportFormatError(RuntimeError):
    """An export folder that is incomplete, damaged, of another format, or whose model does
    not match its schema."""


@dataclass(frozen=True)
class Decision:
    """One routing decision: the replica index and the policy's outputs for every replica
    (``logits``: scores at temperature 1; ``probabilities``: their softmax)."""

    replica: int
    probabilities: np.ndarray
    logits: np.ndarray


def _is_real(value: Any) -> bool:
    """A real number that is not a boolean (``True`` is an ``int`` to Python, not a load)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


# --------------------------------------------------------------------------- schema checks
def read_schema(path: str | Path) -> dict[str, Any]:
    """``schema.json`` parsed; :class:`ExportFormatError` naming the file, line and column
    when it is not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ExportFormatError(f"{path}: not UTF-8 text (byte {err.start}): the file is "
                                "damaged; export again") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as err:
        raise ExportFormatError(f"{path}: not valid JSON (line {err.lineno}, column "
                                f"{err.colno}: {err.msg}): the file is damaged or truncated; "
                                "export again") from None
    if not isinstance(schema, dict):
        raise ExportFormatError(f"{path}: the top level is a JSON {type(schema).__name__}, "
                                "expected an object")
    return schema


def _field(schema: Mapping[str, Any], where: str, path: str, kind: type | tuple[type, ...],
           default: Any = ...) -> Any:
    """``schema[a][b]...`` for ``path`` ``"a.b"``, of type ``kind``; else one
    :class:`ExportFormatError` naming ``where`` and the field."""
    node: Any = schema
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            if default is not ...:
                return default
            raise ExportFormatError(f"{where}: field {path} is missing")
        node = node[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(node, kinds) or (bool not in kinds and isinstance(node, bool)):
        names = " or ".join(k.__name__ for k in kinds)
        raise ExportFormatError(f"{where}: field {path}={node!r}: expected {names}")
    return node


def _feature_table(schema: Mapping[str, Any], where: str, key: str
                   ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and units of the feature list ``key``."""
    entries = _field(schema, where, key, list)
    names, units = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ExportFormatError(f"{where}: {key}[{i}]={entry!r}: expected an object with "
                                    "a string 'name'")
        names.append(entry["name"])
        units.append(str(entry.get("unit", "")))
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExportFormatError(f"{where}: {key} lists {duplicates} more than once")
    return tuple(names), tuple(units)


def _dims(shape: Any) -> tuple[int | None, ...] | None:
    """A tensor shape with symbolic axes as ``None`` (``None`` for an unknown rank)."""
    if not isinstance(shape, (list, tuple)):
        return None
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) else None for d in shape)


def _conflict(expected: tuple[int | None, ...], actual: tuple[int | None, ...] | None) -> bool:
    """Whether ``actual`` differs from ``expected`` in rank or in an axis both fix."""
    if actual is None:
        return False
    return len(actual) != len(expected) or any(
        e is not None and a is not None and e != a for e, a in zip(expected, actual))


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class ExportedRouter:
    """An exported policy behind ``route(replicas, request) -> replica``.

    :param schema: the export's ``schema.json`` (parsed).
    :param model_path: the ONNX file.
    :param num_threads: onnxruntime intra- and inter-op threads.
    :param deterministic: take the most probable replica (default), else sample with ``rng``.
    :param rng: the generator sampled decisions draw from.
    :param schema_file: where ``schema`` was read from (named in errors; default ``schema``).
    """

    def __init__(self, schema: Mapping[str, Any], model_path: str | Path, *,
                 num_threads: int = 1, deterministic: bool = True,
                 rng: np.random.Generator | None = None,
                 schema_file: str | Path | None = None) -> None:
        where = str(schema_file) if schema_file is not None else "schema"
        if not isinstance(schema, Mapping):
            raise ExportFormatError(f"{where}: a {type(schema).__name__}, expected a mapping")
        if schema.get("format") != SCHEMA_FORMAT or \
                schema.get("format_version") not in SUPPORTED_VERSIONS:
            raise ExportFormatError(
                f"{where}: schema format {schema.get('format')!r} version "
                f"{schema.get('format_version')!r}: expected {SCHEMA_FORMAT!r} version in "
                f"{SUPPORTED_VERSIONS}")
        self.schema = dict(schema)
        self.replica_features, replica_units = _feature_table(schema, where, "replica_features")
        self.request_features, request_units = _feature_table(schema, where, "request_features")
        self.kind: str = _field(schema, where, "policy.kind", str)
        if self.kind not in POLICY_KINDS:
            raise ExportFormatError(f"{where}: field policy.kind={self.kind!r}: expected one "
                                    f"of {list(POLICY_KINDS)}")
        self.recurrent: bool = _field(schema, where, "policy.recurrent", bool)
        mode = _field(schema, where, "replica_count.mode", str)
        expected_mode = "fixed" if self.kind == "flat" else "dynamic"
        if mode != expected_mode:
            raise ExportFormatError(f"{where}: field replica_count.mode={mode!r}: a "
                                    f"{self.kind} policy needs {expected_mode!r}")
        #: The replica count a flat policy needs (``None``: any).
        self.fixed_replicas: int | None = None
        if mode == "fixed":
            self.fixed_replicas = _field(schema, where, "replica_count.replicas", int)
            if self.fixed_replicas < 1:
                raise ExportFormatError(f"{where}: field replica_count.replicas="
                                        f"{self.fixed_replicas}: must be >= 1")
        self.history_window = _field(schema, where, "history_window", int, 0)
        if self.history_window < 0:
            raise ExportFormatError(f"{where}: field history_window={self.history_window}: "
                                    "must be >= 0")
        self._column = {name: i for i, name in enumerate(self.replica_features)}
        self._presence = self._column.get("speed_k")
        if self._presence is None:
            raise ExportFormatError(f"{where}: the per-replica features lack speed_k "
                                    "(presence)")
        #: Columns that may be negative: the engine-model estimates, which a deployment
        #: approximates its own way (the simulator's are >= 0; a replica-set policy reads every
        #: feature clamped at 0, so a negative estimate reads as 0).
        self._signed = np.array([isinstance(e, Mapping) and e.get("source") == "engine_model"
                                 for e in schema["replica_features"]])
        #: Columns in [0, 1] (unit ``fraction``), and the request features that are.
        self._fraction = np.array([u == FRACTION_UNIT for u in replica_units])
        self._upper = np.where(self._fraction, 1.0, np.inf).astype(np.float32)
        self._request_fraction = tuple(u == FRACTION_UNIT for u in request_units)
        if self.recurrent:
            layers = _field(schema, where, "policy.lstm.layers", int)
            hidden = _field(schema, where, "policy.lstm.hidden", int)
            self._state_shape = (layers, 1, hidden)
        self._inputs = self._schema_tensors(schema, where)
        self._outputs = list(OUTPUTS + (STATE_OUTPUTS if self.recurrent else ()))
        declared = list(_field(schema, where, "outputs", (dict, list)))
        if declared != self._outputs:
            raise ExportFormatError(f"{where}: field outputs={declared}: a "
                                    f"{'recurrent ' if self.recurrent else ''}{self.kind} "
                                    f"policy has {self._outputs}")
        self.session = self._open_model(Path(model_path), schema, where, num_threads)
        self._check_model(Path(model_path), where)
        self.deterministic = bool(deterministic)
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.reset()

    @classmethod
    def load(cls, export_dir: str | Path, **kwargs: Any) -> ExportedRouter:
        """The router of an export folder (``schema.json`` and the ONNX file it names)."""
        folder = Path(export_dir)
        if not folder.is_dir():
            raise ExportFormatError(f"{folder}: no such export folder")
        schema_path = folder / SCHEMA_FILE
        if not schema_path.is_file():
            raise ExportFormatError(f"{folder}: no {SCHEMA_FILE} (not an export folder)")
        schema = read_schema(schema_path)
        name = _field(schema, str(schema_path), "onnx.file", str, "policy.onnx")
        if Path(name).name != name:
            raise ExportFormatError(f"{schema_path}: field onnx.file={name!r}: expected a "
                                    "file name in the export folder")
        model_path = folder / name
        if not model_path.is_file():
            raise ExportFormatError(f"{folder}: {model_path.name} is missing")
        return cls(schema, model_path, schema_file=schema_path, **kwargs)

    # ------------------------------------------------------------------ loading
    def _schema_tensors(self, schema: Mapping[str, Any], where: str
                        ) -> dict[str, tuple[int | None, ...]]:
        """The input tensors the policy kind needs, with the shapes the feature lists imply,
        checked against the schema's ``inputs``."""
        per, tail = len(self.replica_features), len(self.request_features)
        if self.kind == "replica_set":
            shapes: dict[str, tuple[int | None, ...]] = {"replicas": (None, None, per),
                                                        "request": (None, tail)}
        else:
            n = self.fixed_replicas or 0
            shapes = {"observation": (None, n * per + tail + self.history_window * n)}
        if self.recurrent:
            layers, _, hidden = self._state_shape
            shapes.update(lstm_h=(layers, None, hidden), lstm_c=(layers, None, hidden))
        declared = _field(schema, where, "inputs", (dict, list))
        if list(declared) != list(shapes):
            raise ExportFormatError(f"{where}: field inputs={list(declared)}: a "
                                    f"{'recurrent ' if self.recurrent else ''}{self.kind} "
                                    f"policy takes {list(shapes)}")
        if isinstance(declared, Mapping):
            for name, expected in shapes.items():
                entry = declared[name]
                shape = _dims(entry.get("shape")) if isinstance(entry, Mapping) else None
                if _conflict(expected, shape):
                    raise ExportFormatError(
                        f"{where}: inputs.{name}.shape={entry['shape']} disagrees with the "
                        f"schema's own feature lists, which imply {_shape_text(expected)} "
                        f"({self._feature_counts()})")
        return shapes

    def _feature_counts(self) -> str:
        text = (f"{len(self.replica_features)} replica_features, "
                f"{len(self.request_features)} request_features")
        if self.kind == "flat":
            text += f", {self.fixed_replicas} replicas, history_window {self.history_window}"
        return text

    def _open_model(self, model_path: Path, schema: Mapping[str, Any], where: str,
                    num_threads: int) -> Any:
        """An onnxruntime session on ``model_path``, whose bytes must hash to the schema's
        ``onnx.sha256`` when it records one."""
        import onnxruntime as ort

        try:
            model = model_path.read_bytes()
        except OSError as err:
            raise ExportFormatError(f"{model_path}: cannot be read ({err.strerror})") from None
        recorded = _field(schema, where, "onnx.sha256", str, None)
        if recorded is not None and hashlib.sha256(model).hexdigest() != recorded.lower():
            raise ExportFormatError(
                f"{model_path}: its SHA-256 {hashlib.sha256(model).hexdigest()[:12]}... "
                f"differs from the {recorded[:12]}... that {where} records: the file was "
                "damaged or replaced after the export; export again")
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = num_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own pybind exception classes
            reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ExportFormatError(f"{model_path}: not a loadable ONNX model "
                                    f"({type(err).__name__}: {reason})") from None

    def _check_model(self, model_path: Path, where: str) -> None:
        """The model's input/output names, dtypes and fixed axes against the schema."""
        actual = [i.name for i in self.session.get_inputs()]
        expected = list(self._inputs)
        if actual != expected:
            raise ExportFormatError(f"{model_path}: the model's inputs {actual} differ from "
                                    f"the schema's {expected} ({where})")
        for tensor in self.session.get_inputs():
            shape = self._inputs[tensor.name]
            if tensor.type != "tensor(float)":
                raise ExportFormatError(f"{model_path}: input {tensor.name!r} is "
                                        f"{tensor.type}, the runtime feeds tensor(float)")
            if _conflict(shape, _dims(tensor.shape)):
                raise ExportFormatError(
                    f"{model_path}: input {tensor.name!r} has shape {tensor.shape}, while "
                    f"{where} implies {_shape_text(shape)} ({self._feature_counts()}): the "
                    "model and the schema come from different exports")
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [name for name in self._outputs if name not in outputs]
        if missing:
            raise ExportFormatError(f"{model_path}: the model has no output(s) {missing} "
                                    f"that {where} lists (its outputs: {outputs})")
        if self.fixed_replicas is not None:
            for tensor in self.session.get_outputs():
                if tensor.name in OUTPUTS and _conflict((None, self.fixed_replicas),
                                                        _dims(tensor.shape)):
                    raise ExportFormatError(
                        f"{model_path}: output {tensor.name!r} has shape {tensor.shape}, "
                        f"while {where} routes exactly {self.fixed_replicas} replicas")

    # ------------------------------------------------------------------ state
    def reset(self, rng: np.random.Generator | None = None) -> None:
        """Start an episode: zero the recurrent state and forget the decision history."""
        if rng is not None:
            self.rng = rng
        if self.recurrent:
            zeros = np.zeros(self._state_shape, dtype=np.float32)
            self._state = (zeros, zeros.copy())
        self._history: deque[int] = deque(maxlen=max(self.history_window, 1))

    def value_ranges(self) -> dict[str, str]:
        """The interval each feature's value must lie in, by name (per-replica features,
        then request features): ``"[0, 1]"`` (fractions), ``"(0, inf)"`` (``speed_k``),
        ``"(-inf, inf)"`` (engine-model estimates) or ``"[0, inf)"``; all finite."""
        ranges = {}
        for j, name in enumerate(self.replica_features):
            ranges[name] = ("(0, inf)" if j == self._presence else "[0, 1]"
                            if self._fraction[j] else "(-inf, inf)" if self._signed[j]
                            else "[0, inf)")
        for name, fraction in zip(self.request_features, self._request_fraction):
            ranges[name] = "[0, 1]" if fraction else "[0, inf)"
        return ranges

    @property
    def stateful(self) -> bool:
        """Whether a decision depends on earlier ones (LSTM state or decision history)."""
        return self.recurrent or self.history_window > 0

    # ------------------------------------------------------------------ inputs
    def replica_matrix(self, replicas: Sequence[Mapping[str, float]] | np.ndarray,
                       columns: Sequence[str] | None = None,
                       ids: Sequence[str] | None = None) -> np.ndarray:
        """The validated ``(N, F)`` float32 matrix of per-replica stats (see the module
        docs); :class:`RouterInputError` naming what is wrong (each replica also by its
        endpoint id from ``ids``, when given)."""
        if ids is not None and len(ids) != len(replicas):
            raise RouterInputError(f"ids: {len(ids)} endpoint ids for {len(replicas)} "
                                   "replicas", part="replicas")
        raw = None
        if isinstance(replicas, np.ndarray):
            matrix = self._from_array(replicas, columns)
        else:
            if columns is not None:
                raise RouterInputError("columns: only for an array of replica stats",
                                       part="replicas")
            matrix, raw = self._from_mappings(replicas, ids)
        self._check_values(matrix, raw, ids)
        return matrix

    def _from_array(self, replicas: np.ndarray, columns: Sequence[str] | None) -> np.ndarray:
        if columns is None:
            raise RouterInputError(
                f"replicas: an array needs columns= naming its {replicas.shape[-1]} columns "
                f"(the policy's per-replica features: {list(self.replica_features)})",
                part="replicas")
        if columns is not self.replica_features and tuple(columns) != self.replica_features:
            columns = tuple(columns)
            self._schema_difference(columns)
        if replicas.dtype.kind not in "fiu":
            raise RouterInputError(f"replicas: an array of dtype {replicas.dtype}: must be "
                                   "numeric (float or int; booleans and strings are refused)",
                                   part="replicas")
        if replicas.ndim != 2 or replicas.shape[1] != len(self.replica_features):
            raise RouterInputError(f"replicas: shape {replicas.shape}, expected (N, "
                                   f"{len(self.replica_features)}) for columns "
                                   f"{list(self.replica_features)}", part="replicas")
        with np.errstate(over="ignore"):  # beyond float32: inf, refused by _check_values
            return np.ascontiguousarray(replicas, dtype=np.float32)

    def _schema_difference(self, columns: tuple[str, ...]) -> None:
        missing = [f for f in self.replica_features if f not in columns]
        unknown = [f for f in columns if f not in self._column]
        if missing or unknown:
            raise RouterInputError(
                f"replica stats have another schema: missing {missing}, unknown {unknown} "
                f"(the policy's per-replica features: {list(self.replica_features)})",
                part="replicas")
        index = next(i for i, (a, b) in enumerate(zip(columns, self.replica_features))
                     if a != b)
        raise RouterInputError(f"replica stats: column {index} is {columns[index]!r}, the "
                               f"policy expects {self.replica_features[index]!r} (order: "
                               f"{list(self.replica_features)})", part="replicas")

    @staticmethod
    def _replica(i: int, ids: Sequence[str] | None) -> str:
        return f"replica {i}" if ids is None else f"replica {i} (endpoint {ids[i]!r})"

    def _from_mappings(self, replicas: Sequence[Mapping[str, float]],
                       ids: Sequence[str] | None) -> tuple[np.ndarray, list[list[Any]]]:
        n = len(replicas)
        if n == 0:
            raise RouterInputError("replicas: no replica to route to", part="replicas")
        features = self.replica_features
        raw = []
        for i, stats in enumerate(replicas):
            if not isinstance(stats, Mapping):
                raise RouterInputError(f"{self._replica(i, ids)}: a {type(stats).__name__}, "
                                       "expected a mapping feature -> value", replica=i,
                                       part="replicas")
            try:
                row = [stats[f] for f in features]
            except KeyError:
                missing = [f for f in features if f not in stats]
                raise RouterInputError(
                    f"{self._replica(i, ids)}: missing feature(s) {missing} (the policy's "
                    f"per-replica features: {list(features)})", replica=i, feature=missing[0],
                    part="replicas") from None
            if len(stats) != len(features):
                unknown = sorted(set(stats) - set(features))
                raise RouterInputError(
                    f"{self._replica(i, ids)}: unknown feature(s) {unknown}: the stats have "
                    f"another schema than the policy's per-replica features {list(features)}",
                    replica=i, feature=str(unknown[0]), part="replicas")
            raw.append(row)
        if not _PLAIN_NUMBERS.issuperset(map(type, chain.from_iterable(raw))):
            for i, row in enumerate(raw):  # name the first value that is not a real number
                for f, value in zip(features, row):
                    if type(value) not in _PLAIN_NUMBERS and not _is_real(value):
                        raise RouterInputError(
                            f"{self._replica(i, ids)}: feature {f!r}={value!r}: not a number "
                            f"(a {type(value).__name__}; expected int or float)", replica=i,
                            feature=f, part="replicas")
        try:
            with np.errstate(over="ignore"):  # beyond float32: inf, named by _check_values
                matrix = np.array(raw, dtype=np.float32)
        except OverflowError:  # an int beyond the float64 range
            i, j = next((i, j) for i, row in enumerate(raw) for j, v in enumerate(row)
                        if abs(v) > _FLOAT32_MAX)
            raise RouterInputError(f"{self._replica(i, ids)}: {features[j]}={raw[i][j]!r}: "
                                   f"must be within float32 range (|value| <= "
                                   f"{_FLOAT32_MAX:.3g})", replica=i, feature=features[j],
                                   part="replicas") from None
        return matrix, raw

    def _check_values(self, matrix: np.ndarray, raw: list[list[Any]] | None = None,
                      ids: Sequence[str] | None = None) -> None:
        n = matrix.shape[0]
        if n == 0:
            raise RouterInputError("replicas: no replica to route to", part="replicas")
        if self.fixed_replicas is not None and n != self.fixed_replicas:
            raise RouterInputError(f"replicas: {n} given, this (flat) policy routes exactly "
                                   f"{self.fixed_replicas}", part="replicas")
        # fast path (four reductions): all >= 0 (NaN fails it), the sum finite (no inf), every
        # replica present, every fraction <= 1; the slow path allows negative engine-model
        # estimates and otherwise finds and names the culprit
        if not (matrix.min() >= 0 and math.isfinite(matrix.sum())
                and matrix[:, self._presence].min() > 0
                and (matrix <= self._upper).all()):
            finite = np.isfinite(matrix)
            bad = ~finite | ((matrix < 0) & ~self._signed) | ((matrix > 1) & self._fraction)
            if bad.any():
                i, j = (int(k) for k in np.argwhere(bad)[0])
                value = float(raw[i][j]) if raw is not None else float(matrix[i, j])
                if not finite[i, j] and math.isfinite(value):
                    rule = f"within float32 range (|value| <= {_FLOAT32_MAX:.3g})"
                elif self._signed[j]:
                    rule = "finite"
                elif self._fraction[j]:
                    rule = "finite and >= 0 and <= 1 (unit: fraction)"
                else:
                    rule = "finite and >= 0"
                name = self.replica_features[j]
                raise RouterInputError(f"{self._replica(i, ids)}: {name}={value!r}: must be "
                                       f"{rule}", replica=i, feature=name, part="replicas")
            if matrix[:, self._presence].min() <= 0:
                i = int(np.argmin(matrix[:, self._presence] > 0))
                raise RouterInputError(
                    f"{self._replica(i, ids)}: speed_k={float(matrix[i, self._presence])!r}: "
                    "must be > 0 (a replica with speed_k 0 reads as an empty slot)",
                    replica=i, feature="speed_k", part="replicas")

    def request_vector(self, request: Mapping[str, float]) -> np.ndarray:
        """The validated request/global features, float32 ``(T,)``."""
        if not isinstance(request, Mapping):
            raise RouterInputError(f"request: a {type(request).__name__}, expected a mapping "
                                   "feature -> value", part="request")
        try:
            values = [request[f] for f in self.request_features]
        except KeyError:
            missing = [f for f in self.request_features if f not in request]
            raise RouterInputError(f"request: missing feature(s) {missing} (expected "
                                   f"{list(self.request_features)})", feature=missing[0],
                                   part="request") from None
        if len(request) != len(values):
            unknown = sorted(set(request) - set(self.request_features))
            raise RouterInputError(f"request: unknown feature(s) {unknown} (expected "
                                   f"{list(self.request_features)})", feature=str(unknown[0]),
                                   part="request")
        for name, value, fraction in zip(self.request_features, values,
                                         self._request_fraction):
            if type(value) not in _PLAIN_NUMBERS and not _is_real(value):
                raise RouterInputError(f"request: {name}={value!r}: not a number (a "
                                       f"{type(value).__name__}; expected int or float)",
                                       feature=name, part="request")
            try:
                number: float | None = float(value)
            except OverflowError:  # an int beyond the float range
                number = None
            if number is None or (math.isfinite(number) and abs(number) > _FLOAT32_MAX):
                raise RouterInputError(f"request: {name}={value!r}: must be within float32 "
                                       f"range (|value| <= {_FLOAT32_MAX:.3g})", feature=name,
                                       part="request")
            if not (number >= 0.0 and math.isfinite(number)) or (fraction and number > 1.0):
                rule = "finite and >= 0" + (" and <= 1 (unit: fraction)" if fraction else "")
                raise RouterInputError(f"request: {name}={number!r}: must be {rule}",
                                       feature=name, part="request")
        return np.asarray(values, dtype=np.float32)

    # ------------------------------------------------------------------ routing
    def decide(self, replicas: Sequence[Mapping[str, float]] | np.ndarray,
               request: Mapping[str, float], *, columns: Sequence[str] | None = None,
               ids: Sequence[str] | None = None) -> Decision:
        """Route one request (see :meth:`route`) and return the policy's outputs too."""
        matrix = self.replica_matrix(replicas, columns, ids)
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
              request: Mapping[str, float], *, columns: Sequence[str] | None = None,
              ids: Sequence[str] | None = None) -> int:
        """The index (into ``replicas``) of the replica for ``request``.

        :param replicas: one mapping ``feature -> value`` per replica, or an ``(N, F)`` array
            with ``columns``.
        :param request: the request/global features by name (``schema.json``
            ``request_features``).
        :param ids: the replicas' endpoint ids (urls, pod names), only named in errors.
        """
        return self.decide(replicas, request, columns=columns, ids=ids).replica

    def _flat(self, matrix: np.ndarray, tail: np.ndarray) -> np.ndarray:
        parts = [matrix.reshape(-1), tail]
        if self.history_window:
            n = matrix.shape[0]
            history = np.zeros((self.history_window, n), dtype=np.float32)
            for k, replica in enumerate(self._history):
                history[k, replica] = 1.0
            parts.append(history.reshape(-1))
        return np.concatenate(parts).astype(np.float32, copy=False)


__all__ = ["Decision", "ExportFormatError", "ExportedRouter", "RouterInputError",
           "read_schema"]
