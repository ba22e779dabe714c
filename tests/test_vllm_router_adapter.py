"""The production-stack-shaped adapter on fabricated and simulator-recorded engine stats.

The exported policy here is a hand-built ONNX graph that scores each replica by minus its
outstanding requests (``lor``), so decisions are known in advance; no torch is needed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from llm_cluster_env.env.cluster_env import LLMClusterEnv  # noqa: E402
from llm_cluster_env.deploy.feature_catalog import deployment_schema  # noqa: E402
from llm_cluster_env.deploy.router_runtime import ExportedRouter, RouterInputError  # noqa: E402
from llm_cluster_env.deploy.vllm_router_adapter import (  # noqa: E402
    EndpointHardware,
    PolicyRoutingLogic,
    approximate_prompt_tokens,
)


# production-stack's shapes (vllm_router.stats.engine_stats.EngineStats, request_stats.
# RequestStats, service_discovery.EndpointInfo), with the fields the adapter reads
@dataclass
class EngineStats:
    num_running_requests: int = 0
    num_queuing_requests: int = 0
    gpu_prefix_cache_hit_rate: float = 0.0
    gpu_prefix_cache_hits_total: int = 0
    gpu_prefix_cache_queries_total: int = 0
    gpu_cache_usage_perc: float = 0.0


@dataclass
class RequestStats:
    qps: float = 0.0
    ttft: float = -1.0
    in_prefill_requests: int = 0
    in_decoding_requests: int = 0
    finished_requests: int = 0
    uptime: int = 0
    avg_decoding_length: float = -1.0
    avg_latency: float = -1.0
    avg_itl: float = -1.0
    num_swapped_requests: int = 0


@dataclass
class EndpointInfo:
    url: str
    model_name: str = "llama"
    added_timestamp: float = 0.0
    model_label: str = ""


@dataclass
class Request:
    headers: dict


def lor_export(folder: Path, layout) -> Path:
    """An export folder whose policy scores replica i by ``-(queued_i + running_i)``."""
    per = layout.num_replica_features
    tail = layout.history_offset - layout.replica_block
    nodes = [
        helper.make_node("Constant", [], ["starts"], value=helper.make_tensor(
            "s", TensorProto.INT64, [1], [0])),
        helper.make_node("Constant", [], ["ends"], value=helper.make_tensor(
            "e", TensorProto.INT64, [1], [2])),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor(
            "a", TensorProto.INT64, [1], [2])),
        helper.make_node("Slice", ["replicas", "starts", "ends", "axes"], ["load"]),
        helper.make_node("ReduceSum", ["load", "axes"], ["total"], keepdims=0),
        helper.make_node("Neg", ["total"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "lor",
        [helper.make_tensor_value_info("replicas", TensorProto.FLOAT, ["batch", "N", per]),
         helper.make_tensor_value_info("request", TensorProto.FLOAT, ["batch", tail])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "N"]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "policy.onnx")
    schema = {"format": "llm-cluster-rl/router-export", "format_version": 1,
              "policy": {"kind": "replica_set", "recurrent": False, "lstm": None},
              "replica_count": {"mode": "dynamic"}, **deployment_schema(layout),
              "inputs": {"replicas": {}, "request": {}},
              "outputs": {"logits": {}, "probabilities": {}},
              "onnx": {"file": "policy.onnx"}}
    (folder / "schema.json").write_text(json.dumps(schema))
    return folder


@pytest.fixture
def env():
    return LLMClusterEnv(scenario="heterogeneous", episode_requests=400)


@pytest.fixture
def runtime(tmp_path, env):
    return ExportedRouter.load(lor_export(tmp_path / "export", env.layout))


HW = EndpointHardware(speed_k=1.43, kv_capacity_k=117.6, prefill_tokens_per_s=9000.0)


def test_fabricated_stats_route_to_the_least_loaded_endpoint(runtime):
    now = [100.0]
    logic = PolicyRoutingLogic(runtime, {"*": HW}, mean_output_tokens=200.0,
                               clock=lambda: now[0])
    endpoints = [EndpointInfo(f"http://engine-{i}:8000") for i in range(3)]
    engine = {endpoints[0].url: EngineStats(5, 2, gpu_cache_usage_perc=0.5),
              endpoints[1].url: EngineStats(1, 0, gpu_cache_usage_perc=0.1),
              endpoints[2].url: EngineStats(3, 1, gpu_cache_usage_perc=0.3)}
    request = Request({"x-request-id": "r-1"})
    url = logic.route_request(endpoints, engine, {}, request, {"prompt": "x" * 4000})
    assert url == endpoints[1].url
    assert logic.last_request_id == "r-1"
    features = logic.last_features
    assert features["request"]["req/prompt_tokens_k"] == pytest.approx(1.0)
    row = features["replicas"][endpoints[0].url]
    assert (row["queued"], row["running"], row["kv_usage"]) == (2.0, 5.0, 0.5)
    assert row["est_ttft_s"] == pytest.approx(1000 / 9000)
    assert row["est_delta_s"] == pytest.approx(1000 / 9000 + 199 * 32 / 1430 + 5 * 1000 / 9000)
    # the routed request is in prefill there until its first token
    now[0] = 100.5
    logic.route_request(endpoints, engine, {}, Request({"x-request-id": "r-2"}),
                        {"prompt_token_ids": list(range(300))})
    row = logic.last_features["replicas"][endpoints[1].url]
    assert row["prefill_tokens_k"] == pytest.approx(1.0)
    assert row["est_wait_s"] == pytest.approx(1000 / 9000)
    assert row["dispatch_share"] == 1.0
    logic.on_tokens(endpoints[1].url, "r-1", 50)
    logic.route_request(endpoints, engine, {}, Request({}), {"prompt_token_ids": [1]},
                        request_id="r-3")
    assert logic.last_request_id == "r-3"
    row = logic.last_features["replicas"][endpoints[1].url]
    assert row["prefill_tokens_k"] == pytest.approx(0.3)  # r-1 decodes, r-2 still prefills
    assert row["decode_tokens_k"] == pytest.approx((1 * 200 - 50) / 1000)
    logic.on_request_complete(endpoints[1].url, "r-1")
    logic.on_request_complete(endpoints[1].url, "r-2")


def test_without_progress_hooks_the_prefill_backlog_comes_from_request_stats(runtime):
    logic = PolicyRoutingLogic(runtime, {"*": HW}, mean_output_tokens=100.0,
                               progress_hooks=False, clock=lambda: 0.0)
    endpoints = [EndpointInfo("http://a"), EndpointInfo("http://b")]
    engine = {"http://a": EngineStats(0, 0), "http://b": EngineStats(4, 0)}
    logic.route_request(endpoints, engine, {}, Request({}), {"prompt_token_ids": [0] * 800})
    logic.route_request(endpoints, engine, {"http://a": RequestStats(in_prefill_requests=3)},
                        Request({}), {"prompt_token_ids": [0] * 400})
    row = logic.last_features["replicas"]["http://a"]
    assert row["prefill_tokens_k"] == pytest.approx(3 * 800 / 1000)  # 3 x the mean prompt so far
    assert row["decode_tokens_k"] == 0.0


def test_features_equal_the_simulators_where_engine_metrics_and_router_state_are_exact(
        runtime, env):
    """Closed loop on the heterogeneous cluster: engine stats recorded from the simulator at
    every decision, the adapter's decision applied. The engine gauges, the static hardware,
    the dispatch share, the prompt length and the arrival rate then equal the observation."""
    layout = env.layout
    obs, _ = env.reset(seed=11)
    urls = [f"http://replica-{i}:8000" for i in range(env.num_replicas)]
    view = env.view
    hardware = {url: EndpointHardware(float(view.speed_k[i]), float(view.kv_capacity_k[i]),
                                      8000.0) for i, url in enumerate(urls)}
    clock = [0.0]
    logic = PolicyRoutingLogic(runtime, hardware, mean_output_tokens=200.0,
                               clock=lambda: clock[0])
    endpoints = [EndpointInfo(u) for u in urls]
    exact = ["queued", "running", "kv_usage", "dispatch_share", "speed_k", "kv_capacity_k"]
    columns = [layout.column[f] for f in exact]
    done, steps = False, 0
    while not done:
        view = env.view
        clock[0] = view.context.now
        stats = {url: EngineStats(num_running_requests=int(view.running[i]),
                                  num_queuing_requests=int(view.queued[i]),
                                  gpu_cache_usage_perc=float(view.kv_usage[i]))
                 for i, url in enumerate(urls)}
        prompt = view.context.request.prompt_tokens
        url = logic.route_request(endpoints, stats, {}, Request({}),
                                  {"prompt_token_ids": [0] * prompt})
        ours = np.array([[logic.last_features["replicas"][u][f] for f in exact] for u in urls])
        np.testing.assert_allclose(ours, view.replicas[:, columns], rtol=1e-6, atol=1e-7)
        request = logic.last_features["request"]
        assert request["req/prompt_tokens_k"] == pytest.approx(view.prompt_tokens_k, rel=1e-6)
        rate = float(view.obs[layout.replica_block + 1])
        assert request["global/arrival_rate"] == pytest.approx(rate, rel=1e-5, abs=1e-6)
        choice = urls.index(url)
        assert choice == int(np.argmin(view.outstanding_requests))  # the lor graph's choice
        _, _, done, _, _ = env.step(choice)
        steps += 1
    assert steps == 400


def test_missing_stats_and_unknown_endpoints_fail_naming_them(runtime):
    logic = PolicyRoutingLogic(runtime, {"http://a": HW}, mean_output_tokens=100.0)
    endpoints = [EndpointInfo("http://a"), EndpointInfo("http://b")]
    with pytest.raises(RouterInputError, match="endpoint http://b: no EndpointHardware"):
        logic.route_request(endpoints, {"http://a": EngineStats(), "http://b": EngineStats()},
                            {}, Request({}), {"prompt": "hi"})
    logic = PolicyRoutingLogic(runtime, {"*": HW}, mean_output_tokens=100.0)
    with pytest.raises(RouterInputError, match="endpoint http://b: no engine stats"):
        logic.route_request(endpoints, {"http://a": EngineStats()}, {}, Request({}), {})
    with pytest.raises(RouterInputError, match="no endpoint to route to"):
        logic.route_request([], {}, {}, Request({}), {})


def test_a_policy_reading_features_the_adapter_cannot_compute_needs_extra_features(tmp_path):
    env = LLMClusterEnv(scenario="multiturn_chat", episode_requests=20)
    runtime = ExportedRouter.load(lor_export(tmp_path / "prefix", env.layout))
    with pytest.raises(ValueError, match=r"reads \['prefix_hit', 'prefix_index_fill', "
                                         r"'cache_usage'\].*extra_features="):
        PolicyRoutingLogic(runtime, {"*": HW}, mean_output_tokens=100.0)
    logic = PolicyRoutingLogic(runtime, {"*": HW}, mean_output_tokens=100.0,
                               extra_features=lambda url, body: {
                                   "prefix_hit": 0.0, "prefix_index_fill": 0.0,
                                   "cache_usage": 0.0})
    url = logic.route_request([EndpointInfo("http://a"), EndpointInfo("http://b")],
                              {"http://a": EngineStats(3, 0), "http://b": EngineStats(0, 1)},
                              {}, Request({}), {"messages": [{"content": "hello there"}]})
    assert url == "http://b"


def test_prompt_length_approximation():
    assert approximate_prompt_tokens({"prompt_token_ids": [1, 2, 3]}) == 3
    assert approximate_prompt_tokens({"prompt": [5, 6]}) == 2
    assert approximate_prompt_tokens({"prompt": "a" * 41}) == 11
    assert approximate_prompt_tokens({"messages": [{"content": "a" * 8},
                                                   {"content": "b" * 7}]}) == 4
    assert approximate_prompt_tokens(None) == 1


@pytest.mark.parametrize("field, value", [("speed_k", 0.0), ("kv_capacity_k", float("nan")),
                                          ("prefill_tokens_per_s", -1.0)])
def test_endpoint_hardware_refuses_bad_values(field, value):
    kwargs = {"speed_k": 1.0, "kv_capacity_k": 100.0, "prefill_tokens_per_s": 5000.0,
              field: value}
    with pytest.raises(ValueError, match=f"EndpointHardware.{field}="):
        EndpointHardware(**kwargs)
