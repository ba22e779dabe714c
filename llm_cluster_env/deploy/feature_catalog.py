"""What each observation feature is outside the simulator: unit, meaning, and where a deployed
router gets it.

The simulator computes every feature of :mod:`llm_cluster_env.env.observation` from its own state.
A router in front of real engines has three sources, and this module says which one each
feature comes from (:class:`FeatureSpec` ``source``):

``engine_metric``
    scraped from the engine's Prometheus ``/metrics`` endpoint (the vLLM metric is named);
``static_hardware``
    a property of the endpoint's GPU and model, known from profiling or configuration;
``router``
    state the router keeps itself: the requests it routed and their progress, its dispatch
    history, the arrival rate it observes, its prefix index;
``engine_model``
    closed-form estimates (:mod:`llm_cluster_env.routing.engine_model`) from per-request progress the
    router tracks; ``/metrics`` does not expose it, so a deployment approximates them;
``request``
    read from the request being routed (its prompt length, after tokenisation);
``oracle``
    not known to a real router (trained only with ``output_length_oracle``).

:func:`deployment_schema` turns an :class:`~llm_cluster_env.env.observation.ObservationLayout`
into the JSON-able feature list an exported router ships with (``train/export.py``). vLLM's
metric names follow its V1 engine: ``vllm:kv_cache_usage_perc`` replaced
``vllm:gpu_cache_usage_perc`` (which vLLM production-stack's ``EngineStats`` still parses as
``gpu_cache_usage_perc``); both are fractions in [0, 1] despite the name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_cluster_env.env.observation import ObservationLayout

SOURCES = ("engine_metric", "static_hardware", "router", "engine_model", "request", "oracle")


@dataclass(frozen=True)
class FeatureSpec:
    """One feature as a deployment sees it.

    :param name: the per-replica column name (``queued``) or the full name of a request/global
        feature (``req/prompt_tokens_k``).
    :param unit: unit of the value the policy expects.
    :param meaning: what it measures.
    :param source: one of :data:`SOURCES`.
    :param how: how a deployed router obtains it (and what it can only approximate).
    :param vllm_metric: the vLLM ``/metrics`` counterpart, when there is one.
    """

    name: str
    unit: str
    meaning: str
    source: str
    how: str
    vllm_metric: str | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"FeatureSpec({self.name!r}).source={self.source!r}: must be one "
                             f"of {SOURCES}")


REPLICA_FEATURE_SPECS: dict[str, FeatureSpec] = {spec.name: spec for spec in (
    FeatureSpec("queued", "requests", "requests waiting in the replica's queue",
                "engine_metric", "scrape the gauge (production-stack: "
                "EngineStats.num_queuing_requests)", "vllm:num_requests_waiting"),
    FeatureSpec("running", "requests", "requests in the replica's running batch "
                "(prefilling or decoding)", "engine_metric", "scrape the gauge "
                "(production-stack: EngineStats.num_running_requests)",
                "vllm:num_requests_running"),
    FeatureSpec("kv_usage", "fraction", "KV-cache blocks in use / KV-cache capacity",
                "engine_metric", "scrape the gauge (a fraction in [0, 1]; vLLM V1 names it "
                "vllm:kv_cache_usage_perc, earlier versions vllm:gpu_cache_usage_perc, which "
                "production-stack reads into EngineStats.gpu_cache_usage_perc)",
                "vllm:kv_cache_usage_perc"),
    FeatureSpec("prefill_tokens_k", "1k tokens", "prompt (and recompute) tokens queued or "
                "running on the replica that are not yet prefilled", "router",
                "sum of the prompt lengths of the requests the router sent there that have "
                "not produced a first token yet (approximate: a partly prefilled chunked "
                "prompt counts whole, preemption recomputes are not seen); vLLM exports only "
                "the cumulative vllm:prompt_tokens_total"),
    FeatureSpec("decode_tokens_k", "1k tokens", "output tokens still to generate by the "
                "replica's active requests, estimated as max(0, (queued + running) * mean "
                "output length - tokens generated so far by them)", "router",
                "(queued + running) from the engine, the mean output length from the "
                "workload's history, tokens generated so far counted on the streamed "
                "responses of the requests the router sent there"),
    FeatureSpec("dispatch_share", "fraction", "share of the router's last "
                "dispatch_share_window dispatches that went to the replica", "router",
                "the router's own dispatch history (exact)"),
    FeatureSpec("speed_k", "1k tokens/s", "decode throughput at the reference batch (32 "
                "requests with 1,024 context tokens each); > 0 marks a present replica",
                "static_hardware", "from profiling the endpoint's GPU and model (the "
                "simulator's value for the same GPU/model is in the export's schema.json, "
                "reference_hardware)"),
    FeatureSpec("kv_capacity_k", "1k tokens", "KV-cache capacity", "static_hardware",
                "num_gpu_blocks * block_size / 1000, both labels of the engine's "
                "vllm:cache_config_info", "vllm:cache_config_info"),
    FeatureSpec("prefix_hit", "fraction", "share of the pending prompt's tokens the router "
                "estimates are cached on the replica, from its own routing history",
                "router", "a router-side prefix index of the prompts routed there "
                "(llm_cluster_env.routing.prefix_index; SGLang-style); vLLM's "
                "vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total give only "
                "the engine's aggregate hit rate"),
    FeatureSpec("prefix_index_fill", "fraction", "blocks the router's prefix index "
                "remembers for the replica / the index capacity", "router",
                "the router-side prefix index's size"),
    FeatureSpec("cache_usage", "fraction", "KV blocks holding reusable cached content (in "
                "use or evictable) / capacity", "router", "KV-cache events published by the "
                "engine (block stored / removed), counted per replica"),
    FeatureSpec("est_wait_s", "s", "estimated time until the pending request's prefill "
                "would start on the replica", "engine_model",
                "needs each queued and running request's prompt, progress and expected "
                "remaining output (llm_cluster_env.routing.engine_model), which /metrics does not "
                "expose: approximate from the router's own tracking"),
    FeatureSpec("est_ttft_s", "s", "estimated time to the pending request's first token "
                "there", "engine_model", "est_wait_s plus the request's own prefill time"),
    FeatureSpec("est_delta_s", "s", "estimated increase of total time in system: the "
                "request's own latency plus the slow-down of the replica's other requests",
                "engine_model", "as est_wait_s, plus the replica's decode iteration time "
                "with and without the request"),
)}

TAIL_FEATURE_SPECS: dict[str, FeatureSpec] = {spec.name: spec for spec in (
    FeatureSpec("req/prompt_tokens_k", "1k tokens", "prompt length of the request being "
                "routed", "request", "tokenise the prompt (vLLM's /tokenize, or the "
                "model's tokenizer in the router)"),
    FeatureSpec("req/output_tokens_k", "1k tokens", "the request's true output length",
                "oracle", "not known to a real router: a policy trained with it cannot be "
                "deployed as is"),
    FeatureSpec("global/arrival_rate", "requests/s", "exponentially decayed arrival rate "
                "of the requests the router receives (time constant "
                "arrival_rate_timescale_s)", "router", "the router's own arrival times, with "
                "the simulator's estimator (LLMClusterEnv's ObservationBuilder.arrival_rate)"),
)}


def history_spec(name: str) -> FeatureSpec:
    """The spec of a decision-history feature ``hist/t-{k}/r{i}``."""
    return FeatureSpec(name, "0/1", "one-hot of the router's own decision k steps ago",
                       "router", "the router's own last decisions")


def spec_of(name: str, per_replica: bool) -> FeatureSpec:
    """The spec of a per-replica column or of a request/global feature name."""
    table = REPLICA_FEATURE_SPECS if per_replica else TAIL_FEATURE_SPECS
    if name in table:
        return table[name]
    if not per_replica and name.startswith("hist/"):
        return history_spec(name)
    kind = "per-replica" if per_replica else "request/global"
    raise KeyError(f"{kind} feature {name!r} has no deployment description in "
                   f"llm_cluster_env.deploy.feature_catalog")


def deployment_schema(layout: ObservationLayout) -> dict[str, Any]:
    """The features of ``layout`` as a deployment reads them: per-replica columns, the
    request/global features after them and the decision history (if any), each with unit,
    meaning, source, how to obtain it and its vLLM metric; plus the settings of the
    router-side estimators."""
    config = layout.config
    tail = list(layout.names[layout.replica_block:layout.history_offset])
    return {
        "replica_features": [asdict(spec_of(n, True)) for n in layout.replica_features],
        "request_features": [asdict(spec_of(n, False)) for n in tail],
        "history_window": config.history_window,
        "router_state": {
            "dispatch_share_window": config.dispatch_share_window,
            "arrival_rate_timescale_s": config.arrival_rate_timescale_s,
            "output_length_oracle": config.output_length_oracle,
        },
    }


__all__ = ["FeatureSpec", "REPLICA_FEATURE_SPECS", "SOURCES", "TAIL_FEATURE_SPECS",
           "deployment_schema", "history_spec", "spec_of"]
