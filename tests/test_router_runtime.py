"""The exported router's runtime refuses bad input by name and checks an export folder when it
loads it.

The export folders here hold hand-built ONNX graphs that score each replica by minus its
outstanding requests (``lor``: logit_i = -(queued_i + running_i)), with the feature lists of a
real export (:func:`~llm_cluster_env.deploy.feature_catalog.deployment_schema`), so decisions
and scores are known in advance and no torch is needed. :func:`write_export` is shared with
``tests/test_serve.py``."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from llm_cluster_env.deploy.feature_catalog import deployment_schema  # noqa: E402
from llm_cluster_env.deploy.router_runtime import (  # noqa: E402
    ExportedRouter,
    ExportFormatError,
    RouterInputError,
)
from llm_cluster_env.env.cluster_env import LLMClusterEnv  # noqa: E402

RUNTIME_FILE = Path(__file__).resolve().parents[1] / "llm_cluster_env" / "deploy" / \
    "router_runtime.py"


def feature_lists(history_window: int = 0) -> dict:
    """The deployment feature lists of the conversation scenario's observation (11 per-replica
    features, 2 request features)."""
    env = LLMClusterEnv(scenario="a100x4_conv_70",
                        observation={"history_window": history_window})
    return deployment_schema(env.layout)


def _lor_graph(per: int, tail: int, input_names=("replicas", "request"), fixed: int | None = None,
               width: int | None = None):
    """``logits = -(queued + running)`` per replica; ``fixed`` builds the flat (MLP) form on
    an observation of ``width`` columns."""
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", fixed or "N"]),
           helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                         ["batch", fixed or "N"])]
    if fixed is None:
        def const(name, value):
            return helper.make_node("Constant", [], [name], value=helper.make_tensor(
                name, TensorProto.INT64, [1], [value]))
        nodes = [const("starts", 0), const("ends", 2), const("axes", 2),
                 helper.make_node("Slice", [input_names[0], "starts", "ends", "axes"], ["load"]),
                 helper.make_node("ReduceSum", ["load", "axes"], ["total"], keepdims=0),
                 helper.make_node("Neg", ["total"], ["logits"])]
        inputs = [helper.make_tensor_value_info(input_names[0], TensorProto.FLOAT,
                                                ["batch", "N", per]),
                  helper.make_tensor_value_info(input_names[1], TensorProto.FLOAT,
                                                ["batch", tail])]
        initializers = []
    else:
        weights = np.zeros((width, fixed), np.float32)
        for i in range(fixed):
            weights[i * per, i] = weights[i * per + 1, i] = -1.0
        initializers = [helper.make_tensor("w", TensorProto.FLOAT, weights.shape,
                                           weights.ravel().tolist())]
        nodes = [helper.make_node("MatMul", [input_names[0], "w"], ["logits"])]
        inputs = [helper.make_tensor_value_info(input_names[0], TensorProto.FLOAT,
                                                ["batch", width])]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(nodes, "lor", inputs, out, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def write_export(folder: Path, *, fixed: int | None = None, history_window: int = 0,
                 model_features: int | None = None, model_tail: int | None = None,
                 model_inputs=("replicas", "request")) -> Path:
    """An export folder of the ``lor`` policy: replica-set (``fixed`` None) or flat on
    ``fixed`` replicas. ``model_features``/``model_tail``/``model_inputs`` build a model that
    disagrees with the schema's feature lists."""
    features = feature_lists(history_window)
    per = model_features or len(features["replica_features"])
    tail = model_tail or len(features["request_features"])
    folder.mkdir(parents=True, exist_ok=True)
    if fixed is None:
        model = _lor_graph(per, tail, model_inputs)
        inputs = {"replicas": {"dtype": "float32", "shape": ["batch", "N",
                                                             len(features["replica_features"])]},
                  "request": {"dtype": "float32",
                              "shape": ["batch", len(features["request_features"])]}}
        count = {"mode": "dynamic", "text": "any N >= 1"}
    else:
        model = _lor_graph(per, tail, ("observation",), fixed=fixed,
                           width=fixed * per + tail + history_window * fixed)
        width = fixed * len(features["replica_features"]) + \
            len(features["request_features"]) + history_window * fixed
        inputs = {"observation": {"dtype": "float32", "shape": ["batch", width]}}
        count = {"mode": "fixed", "replicas": fixed, "text": f"exactly {fixed}"}
    onnx.save(model, folder / "policy.onnx")
    digest = hashlib.sha256((folder / "policy.onnx").read_bytes()).hexdigest()
    schema = {"format": "llm-cluster-rl/router-export", "format_version": 1,
              "policy": {"kind": "flat" if fixed else "replica_set", "recurrent": False,
                         "lstm": None},
              "replica_count": count, **features, "inputs": inputs,
              "outputs": {"logits": {"shape": ["batch", "N"]},
                          "probabilities": {"shape": ["batch", "N"]}},
              "onnx": {"file": "policy.onnx", "opset": 18, "sha256": digest}}
    (folder / "schema.json").write_text(json.dumps(schema, indent=1))
    return folder


def edit_schema(folder: Path, edit) -> None:
    schema = json.loads((folder / "schema.json").read_text())
    edit(schema)
    (folder / "schema.json").write_text(json.dumps(schema))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "lor")


@pytest.fixture(scope="module")
def router(export_dir) -> ExportedRouter:
    return ExportedRouter.load(export_dir)


def stats_and_request(router, replicas=4):
    """Valid stats: replica i has i + 1 queued and 2 running; kv_usage 0.5."""
    stats = [dict.fromkeys(router.replica_features, 1.0) for _ in range(replicas)]
    for i, row in enumerate(stats):
        row.update(queued=float(i + 1), running=2.0, kv_usage=0.5, dispatch_share=0.25)
    return stats, {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 5.0}


# --------------------------------------------------------------------------- input values
def test_the_lor_export_scores_replicas_by_minus_their_outstanding_requests(router):
    stats, request = stats_and_request(router)
    stats[2].update(queued=0.0, running=1.0)
    decision = router.decide(stats, request)
    assert decision.replica == 2
    np.testing.assert_array_equal(decision.logits, [-3.0, -4.0, -1.0, -6.0])
    assert decision.probabilities.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("value", ["2", "many", True, False, None, np.bool_(True), [1.0],
                                   {"v": 1}])
def test_non_numeric_replica_stats_are_refused_naming_replica_feature_and_value(router, value):
    stats, request = stats_and_request(router)
    stats[1]["running"] = value
    with pytest.raises(RouterInputError, match=rf"^replica 1: feature 'running'="
                                               rf"{_re(repr(value))}: not a number \(a "
                                               rf"{type(value).__name__}; expected int or "
                                               r"float\)$") as err:
        router.route(stats, request)
    assert (err.value.replica, err.value.feature, err.value.part) == (1, "running", "replicas")


@pytest.mark.parametrize("value", ["5", True, None])
def test_non_numeric_request_features_are_refused_naming_the_feature(router, value):
    stats, request = stats_and_request(router)
    request["global/arrival_rate"] = value
    with pytest.raises(RouterInputError, match=rf"^request: global/arrival_rate="
                                               rf"{_re(repr(value))}: not a number") as err:
        router.route(stats, request)
    assert (err.value.replica, err.value.feature, err.value.part) == (
        None, "global/arrival_rate", "request")


def test_numpy_and_int_values_route_as_the_same_floats(router):
    stats, request = stats_and_request(router)
    as_float = router.decide(stats, request).logits
    mixed = [{k: (np.float32(v) if k == "kv_usage" else int(v) if k == "queued" else
                  np.int64(v) if k == "running" else v) for k, v in row.items()}
             for row in stats]
    np.testing.assert_array_equal(router.decide(mixed, {**request, "global/arrival_rate": 5})
                                  .logits, as_float)


@pytest.mark.parametrize("dtype", [bool, str, object])
def test_a_non_numeric_array_is_refused_naming_its_dtype(router, dtype):
    stats = np.ones((3, len(router.replica_features))).astype(dtype)
    with pytest.raises(RouterInputError, match=r"replicas: an array of dtype .*: must be "
                                               "numeric"):
        router.route(stats, {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 5.0},
                     columns=router.replica_features)


@pytest.mark.parametrize("feature, value, rule", [
    ("kv_usage", 5.0, r"finite and >= 0 and <= 1 \(unit: fraction\)"),
    ("kv_usage", 1.0001, r"finite and >= 0 and <= 1 \(unit: fraction\)"),
    ("dispatch_share", -0.1, r"finite and >= 0 and <= 1 \(unit: fraction\)"),
    ("kv_usage", float("nan"), r"finite and >= 0 and <= 1 \(unit: fraction\)"),
    ("queued", -3, r"finite and >= 0"),
    ("kv_capacity_k", float("inf"), r"finite and >= 0"),
    ("running", float("-inf"), r"finite and >= 0"),
    ("est_wait_s", float("nan"), r"finite"),
    ("queued", 1e39, r"within float32 range \(\|value\| <= 3.4e\+38\)"),
    ("speed_k", 0, r"> 0 \(a replica with speed_k 0 reads as an empty slot\)"),
])
def test_out_of_range_stats_are_refused_naming_replica_feature_and_value(router, feature,
                                                                         value, rule):
    stats, request = stats_and_request(router)
    stats[3][feature] = value
    expected = _re(repr(float(value)))
    with pytest.raises(RouterInputError, match=rf"^replica 3: {feature}={expected}: must be "
                                               rf"{rule}$") as err:
        router.route(stats, request)
    assert (err.value.replica, err.value.feature) == (3, feature)
    ids = ["pod-a", "pod-b", "pod-c", "pod-d"]
    with pytest.raises(RouterInputError, match=rf"^replica 3 \(endpoint 'pod-d'\): {feature}="):
        router.route(stats, request, ids=ids)
    # the same value in an array is refused by the same rule
    matrix = np.array([[row[f] for f in router.replica_features] for row in stats])
    with pytest.raises(RouterInputError, match=rf"^replica 3: {feature}="):
        router.route(matrix, request, columns=router.replica_features)


def test_an_int_beyond_the_float_range_is_refused_naming_it(router):
    stats, request = stats_and_request(router)
    stats[2]["queued"] = 10 ** 400
    with pytest.raises(RouterInputError, match=r"^replica 2: queued=1000+: must be within "
                                               r"float32 range"):
        router.route(stats, request)


def test_fractions_at_their_bounds_and_negative_engine_model_estimates_are_accepted(router):
    stats, request = stats_and_request(router)
    stats[0].update(kv_usage=1.0, dispatch_share=0.0)
    stats[1].update(kv_usage=0.0, dispatch_share=1.0, est_delta_s=-2.5)
    assert router.route(stats, request) == 0


@pytest.mark.parametrize("feature, value, rule", [
    ("global/arrival_rate", -1.0, "finite and >= 0"),
    ("req/prompt_tokens_k", float("nan"), "finite and >= 0"),
    ("req/prompt_tokens_k", 10 ** 400, r"within float32 range"),
])
def test_out_of_range_request_features_are_refused_naming_them(router, feature, value, rule):
    stats, request = stats_and_request(router)
    request[feature] = value
    with pytest.raises(RouterInputError, match=rf"^request: {feature}=.*: must be {rule}"):
        router.route(stats, request)


def test_value_ranges_follow_the_schema_units_and_sources(router):
    ranges = router.value_ranges()
    assert list(ranges) == [*router.replica_features, *router.request_features]
    assert {name for name, r in ranges.items() if r == "[0, 1]"} == {"kv_usage",
                                                                      "dispatch_share"}
    assert ranges["speed_k"] == "(0, inf)"
    assert {name for name, r in ranges.items() if r == "(-inf, inf)"} == {
        "est_wait_s", "est_ttft_s", "est_delta_s"}
    assert ranges["queued"] == ranges["global/arrival_rate"] == "[0, inf)"


def test_endpoint_ids_must_match_the_replicas(router):
    stats, request = stats_and_request(router)
    with pytest.raises(RouterInputError, match="ids: 2 endpoint ids for 4 replicas"):
        router.route(stats, request, ids=["a", "b"])


# --------------------------------------------------------------------------- damaged files
def copy_of(export_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(export_dir, folder)
    return folder


def test_a_truncated_model_is_refused_by_its_recorded_checksum(export_dir, tmp_path):
    folder = copy_of(export_dir, tmp_path)
    data = (folder / "policy.onnx").read_bytes()
    (folder / "policy.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportFormatError, match=rf"^{_re(str(folder / 'policy.onnx'))}: its "
                                                r"SHA-256 \w{12}\.\.\. differs from the "
                                                rf"\w{{12}}\.\.\. that {_re(str(folder))}"
                                                r"/schema.json records: the file was damaged"):
        ExportedRouter.load(folder)


@pytest.mark.parametrize("content", [b"", b"not a model", b"\x08\x09" * 50])
def test_a_model_onnxruntime_cannot_parse_is_refused_naming_the_file(export_dir, tmp_path,
                                                                     content):
    folder = copy_of(export_dir, tmp_path)
    (folder / "policy.onnx").write_bytes(content)
    edit_schema(folder, lambda s: s["onnx"].pop("sha256"))
    with pytest.raises(ExportFormatError, match=rf"^{_re(str(folder / 'policy.onnx'))}: not a "
                                                r"loadable ONNX model \(\w+: .+\)$"):
        ExportedRouter.load(folder)


@pytest.mark.parametrize("text, message", [
    ('{"format": "llm-cluster-rl/router-export", "format_ver',
     r"not valid JSON \(line 1, column 44: Unterminated string starting at\): the file is damaged or "
     "truncated"),
    ("", r"not valid JSON \(line 1, column 1: Expecting value\)"),
    ("[1, 2]", "the top level is a JSON list, expected an object"),
    (b"\xff\xfe{}", r"not UTF-8 text \(byte 0\)"),
])
def test_a_damaged_schema_is_refused_naming_the_file_and_the_fault(export_dir, tmp_path, text,
                                                                   message):
    folder = copy_of(export_dir, tmp_path)
    if isinstance(text, bytes):
        (folder / "schema.json").write_bytes(text)
    else:
        (folder / "schema.json").write_text(text)
    with pytest.raises(ExportFormatError, match=rf"^{_re(str(folder / 'schema.json'))}: "
                                                f"{message}"):
        ExportedRouter.load(folder)


def _drop(path):
    def edit(schema):
        *parents, key = path.split(".")
        node = schema
        for p in parents:
            node = node[p]
        del node[key]
    return edit


@pytest.mark.parametrize("edit, message", [
    (_drop("policy.kind"), "field policy.kind is missing"),
    (_drop("replica_features"), "field replica_features is missing"),
    (lambda s: s.update(replica_features="queued"),
     "field replica_features='queued': expected list"),
    (lambda s: s["replica_features"][2].pop("name"), r"replica_features\[2\]=.*: expected an "
                                                     "object with a string 'name'"),
    (lambda s: s["request_features"].append(dict(s["request_features"][0])),
     r"request_features lists \['req/prompt_tokens_k'\] more than once"),
    (lambda s: s["policy"].update(kind="cnn"),
     r"field policy.kind='cnn': expected one of \['flat', 'replica_set'\]"),
    (lambda s: s["policy"].update(recurrent="no"), "field policy.recurrent='no': expected bool"),
    (lambda s: s["replica_count"].update(mode="fixed"),
     "field replica_count.mode='fixed': a replica_set policy needs 'dynamic'"),
    (lambda s: s.update(history_window=-1), "field history_window=-1: must be >= 0"),
    (lambda s: s["onnx"].update(file="../policy.onnx"),
     r"field onnx.file='../policy.onnx': expected a file name in the export folder"),
    (lambda s: s["inputs"]["replicas"].update(shape=["batch", "N", 12]),
     r"inputs.replicas.shape=\['batch', 'N', 12\] disagrees with the schema's own feature "
     r"lists, which imply \[\?, \?, 11\] \(11 replica_features, 2 request_features\)"),
    (lambda s: s.update(outputs={"logits": {}}),
     r"field outputs=\['logits'\]: a replica_set policy has \['logits', 'probabilities'\]"),
])
def test_a_schema_with_a_missing_or_wrong_field_is_refused_naming_it(export_dir, tmp_path,
                                                                     edit, message):
    folder = copy_of(export_dir, tmp_path)
    edit_schema(folder, edit)
    with pytest.raises(ExportFormatError, match=rf"^{_re(str(folder / 'schema.json'))}: "
                                                f"{message}"):
        ExportedRouter.load(folder)


# --------------------------------------------------------------------------- schema vs model
def test_a_model_with_other_input_names_fails_at_load_naming_both(tmp_path):
    folder = write_export(tmp_path / "x", model_inputs=("stats", "request"))
    with pytest.raises(ExportFormatError, match=rf"^{_re(str(folder / 'policy.onnx'))}: the "
                                                r"model's inputs \['stats', 'request'\] differ "
                                                r"from the schema's \['replicas', 'request'\] "
                                                rf"\({_re(str(folder / 'schema.json'))}\)$"):
        ExportedRouter.load(folder)


@pytest.mark.parametrize("build, message", [
    (dict(model_features=12), r"input 'replicas' has shape \['batch', 'N', 12\], while "
                              r"{schema} implies \[\?, \?, 11\] \(11 replica_features, 2 "
                              r"request_features\): the model and the schema come from "
                              "different exports"),
    (dict(model_tail=3), r"input 'request' has shape \['batch', 3\], while {schema} implies "
                         r"\[\?, 2\]"),
    (dict(fixed=4, model_features=10), r"input 'observation' has shape \['batch', 42\], "
                                       r"while {schema} implies \[\?, 46\] \(11 "
                                       r"replica_features, 2 request_features, 4 replicas, "
                                       r"history_window 0\)"),
])
def test_a_model_whose_feature_count_differs_from_the_schema_fails_at_load(tmp_path, build,
                                                                           message):
    folder = write_export(tmp_path / "x", **build)
    with pytest.raises(ExportFormatError, match="^" + _re(str(folder / "policy.onnx")) + ": " +
                       message.format(schema=_re(str(folder / "schema.json")))):
        ExportedRouter.load(folder)


def test_a_flat_schema_whose_replica_count_differs_from_the_model_fails_at_load(tmp_path):
    folder = write_export(tmp_path / "x", fixed=4)

    def five(schema):
        schema["replica_count"]["replicas"] = 5
        schema["inputs"]["observation"]["shape"] = ["batch", 57]
    edit_schema(folder, five)
    with pytest.raises(ExportFormatError, match=r"input 'observation' has shape \['batch', 46\], "
                                                r"while .* implies \[\?, 57\] .*5 replicas"):
        ExportedRouter.load(folder)


def test_a_flat_export_routes_exactly_its_replica_count_in_order(tmp_path):
    router = ExportedRouter.load(write_export(tmp_path / "flat", fixed=3, history_window=2))
    assert router.fixed_replicas == 3 and router.stateful
    stats, request = stats_and_request(router, replicas=3)
    stats[1]["queued"] = 0.0
    decision = router.decide(stats, request)
    assert decision.replica == 1
    np.testing.assert_array_equal(decision.logits, [-3.0, -2.0, -5.0])
    with pytest.raises(RouterInputError, match="replicas: 4 given, this .flat. policy routes "
                                               "exactly 3"):
        router.route(stats_and_request(router, replicas=4)[0], request)


# --------------------------------------------------------------------------- portability
_STANDALONE = textwrap.dedent('''
    import json, sys

    class RefuseOthers:
        """Only the standard library, numpy and onnxruntime may be imported."""
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in ("llm_cluster_env", "sb3_warmstart", "gymnasium", "torch", "onnx",
                       "stable_baselines3", "yaml", "scipy"):
                raise ImportError(f"{name} is not importable in this process")
            return None

    sys.meta_path.insert(0, RefuseOthers())
    sys.path.insert(0, sys.argv[1])
    import router_runtime
    lazy = "onnxruntime" not in sys.modules
    router = router_runtime.ExportedRouter.load(sys.argv[1])
    stats = [dict.fromkeys(router.replica_features, 1.0) for _ in range(3)]
    stats[2]["queued"] = 0.0
    choice = router.route(stats, {"req/prompt_tokens_k": 1.0, "global/arrival_rate": 2.0})
    print(json.dumps({"lazy": lazy, "choice": choice}))
''')


def test_the_runtime_copied_into_an_export_folder_needs_only_numpy_and_onnxruntime(export_dir,
                                                                                    tmp_path):
    folder = copy_of(export_dir, tmp_path)
    shutil.copy2(RUNTIME_FILE, folder / "router_runtime.py")
    script = tmp_path / "standalone.py"
    script.write_text(_STANDALONE)
    done = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"lazy": True, "choice": 2}


def _re(text: str) -> str:
    import re

    return re.escape(text)
