"""The production-stack-shaped adapter on fabricated and simulator-recorded engine stats.

The exported policy here is a hand-built ONNX graph that scores each replica by minus its
outstanding requests (``lor``), so decisions are known in advance; no torch is needed."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from llm_cluster_env.deploy.feature_catalog import deployment_schema  # noqa: E402
from llm_cluster_env.deploy.router_runtime import ExportedRouter, RouterInputError  # noqa: E402
from llm_cluster_env.deploy.vllm_router_adapter import (  # noqa: E402
    EndpointHardware,
    PolicyRoutingLogic,
    approximate_prompt_tokens,
    engine_gauges,
    load_router_config,
)
from llm_cluster_env.env.cluster_env import LLMClusterEnv  # noqa: E402


# production-stack's classes, field for field (vllm_router.stats.engine_stats.EngineStats,
# stats.request_stats.RequestStats, service_discovery.EndpointInfo of the pinned source;
# test_stand_ins_have_production_stacks_fields checks them against it)
@dataclass
class EngineStats:
    num_running_requests: int = 0
    num_queuing_requests: int = 0
    gpu_prefix_cache_hit_rate: float = 0.0
    gpu_prefix_cache_hits_total: int = 0
    gpu_prefix_cache_queries_total: int = 0
    gpu_cache_usage_perc: float = 0.0


@dataclass
class PatchedEngineStats(EngineStats):
    """``EngineStats`` with deploy/production_stack/learned_router.patch applied."""

    kv_cache_usage_perc: float | None = None


@dataclass
class RequestStats:
    qps: float
    ttft: float
    in_prefill_requests: int
    in_decoding_requests: int
    finished_requests: int
    uptime: int
    avg_decoding_length: float
    avg_latency: float
    avg_itl: float
    num_swapped_requests: int


@dataclass
class EndpointInfo:
    url: str
    model_names: list
    Id: str
    added_timestamp: float
    model_label: str
    sleep: bool
    healthy: bool = True
    pod_name: str | None = None
    service_name: str | None = None
    namespace: str | None = None
    model_info: dict | None = None


def endpoint(url: str, label: str = "default") -> EndpointInfo:
    """An endpoint as production-stack's static service discovery lists it."""
    return EndpointInfo(url=url, model_names=["llama"], Id=url, added_timestamp=0.0,
                        model_label=label, sleep=False)


def request_stats(**fields) -> RequestStats:
    """``RequestStats`` of an endpoint with no traffic yet, with ``fields`` set."""
    values = dict(qps=0.0, ttft=-1.0, in_prefill_requests=0, in_decoding_requests=0,
                  finished_requests=0, uptime=0, avg_decoding_length=-1.0, avg_latency=-1.0,
                  avg_itl=-1.0, num_swapped_requests=0)
    return RequestStats(**{**values, **fields})


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
    endpoints = [endpoint(f"http://engine-{i}:8000") for i in range(3)]
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
    endpoints = [endpoint("http://a"), endpoint("http://b")]
    engine = {"http://a": EngineStats(0, 0), "http://b": EngineStats(4, 0)}
    logic.route_request(endpoints, engine, {}, Request({}), {"prompt_token_ids": [0] * 800})
    logic.route_request(endpoints, engine, {"http://a": request_stats(in_prefill_requests=3)},
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
    endpoints = [endpoint(u) for u in urls]
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


def test_the_constants_copied_from_the_observation_builder_still_equal_its_own():
    """The adapter imports no simulator module, so it keeps its own copies; a change on one
    side only would silently shift ``est_*_s`` or the arrival rate the policy sees."""
    from llm_cluster_env.deploy import vllm_router_adapter as adapter
    from llm_cluster_env.env import observation

    assert adapter.REFERENCE_BATCH == observation.REFERENCE_BATCH
    assert adapter.MIN_RATE_WINDOW_FRACTION == observation.MIN_RATE_WINDOW_FRACTION


def test_an_endpoint_without_hardware_is_a_configuration_error_naming_it(runtime):
    logic = PolicyRoutingLogic(runtime, {"http://a": HW}, mean_output_tokens=100.0)
    endpoints = [endpoint("http://a"), endpoint("http://b", label="h100")]
    with pytest.raises(RouterInputError, match="endpoint http://b: no EndpointHardware for "
                                               "its url or its model_label 'h100'"):
        logic.route_request(endpoints, {"http://a": EngineStats(), "http://b": EngineStats()},
                            {}, Request({}), {"prompt": "hi"})
    logic = PolicyRoutingLogic(runtime, {"*": HW}, mean_output_tokens=100.0)
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
    url = logic.route_request([endpoint("http://a"), endpoint("http://b")],
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


# ---------------------------------------------------------------------- production hardening
PRODSTACK = Path(__file__).resolve().parents[2] / "shared" / "thirdparty" / "production-stack"


def dataclass_fields(source: Path, name: str) -> list[tuple[str, bool]]:
    """``(field, has a default)`` of dataclass ``name`` in ``source``, read with ``ast``
    (production-stack's dependencies are not in this venv)."""
    import ast

    tree = ast.parse(source.read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
    return [(n.target.id, n.value is not None) for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


@pytest.mark.skipif(not PRODSTACK.is_dir(), reason=f"{PRODSTACK} is absent")
@pytest.mark.parametrize("module, cls", [("stats/engine_stats.py", EngineStats),
                                         ("stats/request_stats.py", RequestStats),
                                         ("service_discovery.py", EndpointInfo)])
def test_stand_ins_have_production_stacks_fields(module, cls):
    from dataclasses import MISSING, fields

    theirs = dataclass_fields(PRODSTACK / "src" / "vllm_router" / module, cls.__name__)
    ours = [(f.name, f.default is not MISSING) for f in fields(cls)]
    assert ours == theirs


def lor_logic(runtime, hardware=None, **kwargs):
    now = kwargs.pop("now", [0.0])
    return PolicyRoutingLogic(runtime, hardware or {"*": HW}, mean_output_tokens=100.0,
                              clock=lambda: now[0], **kwargs)


def test_kv_usage_is_the_patched_v1_field_and_none_is_refused_by_name(runtime):
    logic = lor_logic(runtime)
    a, b = endpoint("http://a"), endpoint("http://b")
    stats = {"http://a": PatchedEngineStats(1, 0, gpu_cache_usage_perc=0.0,
                                            kv_cache_usage_perc=0.37),
             "http://b": PatchedEngineStats(0, 0, kv_cache_usage_perc=None)}
    with pytest.raises(RouterInputError, match=r"endpoint http://b: EngineStats\."
                       r"kv_cache_usage_perc=None: the engine exports neither "
                       r"vllm:kv_cache_usage_perc nor vllm:gpu_cache_usage_perc"):
        engine_gauges("http://b", stats["http://b"])
    assert engine_gauges("http://a", stats["http://a"]) == (0.0, 1.0, 0.37)
    # b has no usable stats: the policy routes among the others (here: a alone)
    assert logic.route_request([a, b], stats, {}, Request({}), {}) == "http://a"
    assert logic.last_features["replicas"]["http://a"]["kv_usage"] == 0.37
    assert list(logic.last_features["replicas"]) == ["http://a"]


class Partial:
    """Stats lacking fields (another production-stack version, a custom scraper)."""

    num_running_requests = 2


@pytest.mark.parametrize("stats, message", [
    (EngineStats(num_running_requests=None), "EngineStats.num_running_requests=None: must be"),
    (EngineStats(num_queuing_requests="3"), "EngineStats.num_queuing_requests='3': must be"),
    (EngineStats(gpu_cache_usage_perc=float("nan")), "gpu_cache_usage_perc=nan: must be"),
    (EngineStats(num_queuing_requests=-1), "num_queuing_requests=-1: must be a finite"),
    (PatchedEngineStats(kv_cache_usage_perc=37.0), "kv_cache_usage_perc=37.0: must be a "
                                                   "fraction <= 1"),
    (Partial(), "EngineStats has no field 'num_queuing_requests'"),
    (None, "no engine stats"),
])
def test_unusable_stats_name_the_endpoint_and_field_and_the_request_still_routes(
        runtime, stats, message, caplog):
    with pytest.raises(RouterInputError, match=f"endpoint http://b: .*{re.escape(message)}"):
        engine_gauges("http://b", stats)
    logic = lor_logic(runtime)
    engines = {"http://a": EngineStats(9, 9, gpu_cache_usage_perc=0.9), "http://b": stats}
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            url = logic.route_request([endpoint("http://a"), endpoint("http://b")], engines, {},
                                      Request({}), {})
    assert url == "http://a"  # the loaded endpoint with stats, not the one without
    warnings = [r.getMessage() for r in caplog.records if "http://b" in r.getMessage()]
    assert len(warnings) == 1 and message in warnings[0]  # logged once, not per request


def test_without_any_stats_requests_go_to_the_fewest_in_flight_never_fail(runtime, tmp_path):
    logic = lor_logic(runtime, features_log=tmp_path / "f.jsonl")
    endpoints = [endpoint(u) for u in ("http://a", "http://b", "http://c")]
    chosen = [logic.route_request(endpoints, {}, {}, Request({}), {}, request_id=f"r{i}")
              for i in range(4)]
    assert chosen == ["http://a", "http://b", "http://c", "http://a"]
    logic.on_request_complete("http://b", "r1")
    assert logic.route_request(endpoints, {}, {}, Request({}), {}, request_id="r4") == \
        "http://b"
    assert "3 of 3 endpoint(s) without usable stats" in logic.last_features["fallback"]
    logic.close()
    lines = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["route"] * 4 + ["complete", "route", "close"]
    assert lines[-1]["in_flight"] == {"http://a": ["r0", "r3"], "http://b": ["r4"],
                                      "http://c": ["r2"]}


def test_duplicate_endpoint_urls_are_refused(runtime):
    logic = lor_logic(runtime)
    with pytest.raises(RouterInputError, match="endpoints: http://a is listed 2 times"):
        logic.route_request([endpoint("http://a"), endpoint("http://b"), endpoint("http://a")],
                            {}, {}, Request({}), {})


def test_runtime_errors_name_the_endpoint_url_not_the_replica_index(tmp_path):
    env = LLMClusterEnv(scenario="multiturn_chat", episode_requests=20)
    runtime = ExportedRouter.load(lor_export(tmp_path / "prefix", env.layout))
    logic = PolicyRoutingLogic(runtime, {"*": HW}, mean_output_tokens=100.0,
                               extra_features=lambda url, body: {
                                   "prefix_hit": -0.5 if url == "http://b" else 0.0,
                                   "prefix_index_fill": 0.0, "cache_usage": 0.0})
    with pytest.raises(RouterInputError, match=r"^endpoint http://b: prefix_hit=-0.5: must be "
                                               "finite and >= 0"):
        logic.route_request([endpoint("http://a"), endpoint("http://b")],
                            {"http://a": EngineStats(), "http://b": EngineStats()}, {},
                            Request({}), {})


def test_request_ids_thread_through_the_hooks_and_nothing_stays_in_flight(runtime):
    logic = lor_logic(runtime)
    endpoints = [endpoint("http://a"), endpoint("http://b")]
    engines = {"http://a": EngineStats(0, 0), "http://b": EngineStats(5, 0)}
    # production-stack's own id (the client's X-Request-Id or a uuid it made) is passed in
    logic.route_request(endpoints, engines, {}, Request({}), {"prompt_token_ids": [0] * 500},
                        request_id="ps-1")
    assert logic.in_flight_count() == 1
    logic.on_chunk("http://a", "ps-1", b'data: {"x": 1}\n\ndata: {"x": 2}\n\n')
    row = logic.replica_features("http://a", engines["http://a"], None, 10)
    assert row["prefill_tokens_k"] == 0.0  # the first chunk ends its prefill
    logic.on_chunk("http://a", "ps-1", b'data: {"x": 3}\n\ndata: [DONE]\n\n')
    assert logic._in_flight["http://a"]["ps-1"].generated == 3
    logic.on_request_complete("http://a", "ps-1")
    # no id at all: routed, not tracked (no hook could ever name it)
    logic.route_request(endpoints, engines, {}, Request({}), {})
    assert logic.last_request_id is None
    # the header when no id is passed
    logic.route_request(endpoints, engines, {}, Request({"x-request-id": "h-1"}), {})
    logic.on_request_complete("http://a", "h-1")
    assert logic.in_flight_count() == 0 and logic._in_flight == {}


def test_a_failover_retry_moves_the_dispatch_and_records_no_second_arrival(runtime):
    now = [0.0]
    logic = lor_logic(runtime, now=now)
    a, b, c = endpoint("http://a"), endpoint("http://b"), endpoint("http://c")
    engines = {"http://a": EngineStats(0, 0), "http://b": EngineStats(1, 0),
               "http://c": EngineStats(2, 0)}
    for i in range(3):
        now[0] = float(i)
        logic.route_request([a, b, c], engines, {}, Request({}), {}, request_id=f"r{i}")
    rate = logic.arrivals.rate()
    # r2 failed on a (production-stack calls the completion hook, then re-routes it)
    logic.on_request_complete("http://a", "r2")
    now[0] = 2.5
    url = logic.route_request([b, c], engines, {}, Request({}), {}, request_id="r2",
                              failed_url="http://a")
    assert url == "http://b"
    assert logic.arrivals.rate() == rate  # no new arrival
    assert logic._prompts_routed == 3
    logic.route_request([a, b, c], engines, {}, Request({}), {}, request_id="r3")
    shares = {u: row["dispatch_share"] for u, row in logic.last_features["replicas"].items()}
    assert shares == {"http://a": 2 / 3, "http://b": 1 / 3, "http://c": 0.0}
    assert set(logic._in_flight) == {"http://a", "http://b"}


def test_an_endpoint_that_disappears_is_forgotten(runtime):
    logic = lor_logic(runtime)
    a, b, c = endpoint("http://a"), endpoint("http://b"), endpoint("http://c")
    idle = {u: EngineStats(0, 0) for u in ("http://a", "http://b", "http://c")}
    for i, target in enumerate(["http://a", "http://c", "http://b"]):  # lor: the idle one
        engines = {u: EngineStats(0 if u == target else 3, 0) for u in idle}
        assert logic.route_request([a, b, c], engines, {}, Request({}), {},
                                   request_id=f"r{i}") == target
    assert logic._recent_counts == {"http://a": 1, "http://c": 1, "http://b": 1}
    # c is gone (scaled down): its dispatch and its in-flight request go with it
    logic.route_request([a, b], idle, {}, Request({}), {}, request_id="r3")
    shares = {u: row["dispatch_share"] for u, row in logic.last_features["replicas"].items()}
    assert shares == {"http://a": 0.5, "http://b": 0.5}
    assert sum(shares.values()) == 1.0
    assert "http://c" not in logic._in_flight
    # an endpoint of another model (not routed to now) is kept when production-stack passes
    # every endpoint it knows
    logic.route_request([b], idle, {}, Request({}), {}, request_id="r4",
                        known_urls=["http://a", "http://b"])
    assert set(logic._in_flight) == {"http://a", "http://b"}


def test_hardware_by_url_then_label_then_default(runtime):
    fast = EndpointHardware(speed_k=3.0, kv_capacity_k=400.0, prefill_tokens_per_s=20000.0)
    logic = lor_logic(runtime, {"http://a": HW, "*": EndpointHardware(1.0, 50.0, 1000.0)},
                      label_hardware={"h100": fast})
    endpoints = [endpoint("http://a", "h100"), endpoint("http://b", "h100"),
                 endpoint("http://c", "a10")]
    logic.route_request(endpoints, {u.url: EngineStats() for u in endpoints}, {}, Request({}),
                        {})
    speeds = {u: row["speed_k"] for u, row in logic.last_features["replicas"].items()}
    assert speeds == {"http://a": HW.speed_k, "http://b": 3.0, "http://c": 1.0}


def test_router_config_from_a_file_and_flags(tmp_path, runtime):
    export = tmp_path / "export"  # the runtime fixture's export folder
    hw = {"speed_k": 1.4, "kv_capacity_k": 117.6, "prefill_tokens_per_s": 9000}
    (tmp_path / "c.yaml").write_text(
        f"export_dir: {export}\nmean_output_tokens: 250\nrouter_replicas: 2\n"
        f"hardware:\n  endpoints:\n    http://a: {json.dumps(hw)}\n"
        f"  labels:\n    h100: {json.dumps({**hw, 'speed_k': 3.0})}\n")
    config = load_router_config(tmp_path / "c.yaml", mean_output_tokens=180,
                                features_log=tmp_path / "f.jsonl")
    assert config.mean_output_tokens == 180.0 and config.router_replicas == 2
    assert config.hardware == {"http://a": EndpointHardware(**hw)}
    assert config.label_hardware["h100"].speed_k == 3.0 and config.default_hardware is None
    logic = PolicyRoutingLogic.from_config(config)
    assert logic.mean_output_tokens == 180.0 and logic.router_replicas == 2
    logic.close()
    # JSON, with the export folder from the command line
    (tmp_path / "c.json").write_text(json.dumps({"hardware": {"default": hw}}))
    config = load_router_config(tmp_path / "c.json", export_dir=export, mean_output_tokens=99)
    assert config.default_hardware == EndpointHardware(**hw) and config.features_log is None
    with pytest.raises(ValueError, match="c.json: export_dir='/nowhere': no schema.json there"):
        load_router_config(tmp_path / "c.json", export_dir="/nowhere", mean_output_tokens=99)
    with pytest.raises(ValueError, match="c.json: export_dir is not set"):
        load_router_config(tmp_path / "c.json", mean_output_tokens=99)


@pytest.mark.parametrize("name, text, message", [
    ("c.json", '{"mean_output_tokens": 100,', "not valid JSON (line 1, column 28"),
    ("c.yaml", "mean_output_tokens: [100\nhardware: {}\n", "not valid YAML (line 2, column 9)"),
])
def test_an_unparsable_router_config_is_refused_naming_the_file_and_line(tmp_path, name, text,
                                                                         message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        load_router_config(path, export_dir=tmp_path / "export")


@pytest.mark.parametrize("content, message", [
    ({"hardware": {"default": {}}}, r"mean_output_tokens=None: must be a number >= 1"),
    ({"mean_output_tokens": 100}, r"hardware=None: expected a mapping"),
    ({"mean_output_tokens": 100, "hardware": {"gpus": {}}}, r"hardware: unknown key\(s\) "
                                                            r"\['gpus'\]"),
    ({"mean_output_tokens": 100, "hardware": {"labels": {"h100": {"speed_k": 0.0,
                                                                  "kv_capacity_k": 1,
                                                                  "prefill_tokens_per_s": 1}}}},
     r"hardware.labels\['h100'\]: EndpointHardware.speed_k=0.0: must be"),
    ({"mean_output_tokens": 100, "hardware": {"default": {"speed_k": 1}}},
     r"hardware.default: missing \['kv_capacity_k', 'prefill_tokens_per_s'\]"),
    ({"mean_output_tokens": 100, "router_replicas": 0, "hardware": {"default": {}}},
     r"router_replicas=0: must be an integer >= 1"),
    ({"mean_output_tokens": 100, "hardware": {}, "extra": 1}, r"unknown key\(s\) \['extra'\]"),
])
def test_bad_router_config_is_refused_naming_the_file_key_and_value(tmp_path, runtime, content,
                                                                     message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{message}"):
        load_router_config(path, export_dir=tmp_path / "export")
