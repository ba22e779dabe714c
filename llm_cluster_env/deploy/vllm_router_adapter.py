"""An exported router in the shape of vLLM production-stack's routing interface.

vLLM production-stack's router (``vllm_router``) calls
``route_request(endpoints, engine_stats, request_stats, request) -> url`` on its routing logic
(``RoutingInterface`` in ``vllm_router/routers/routing_logic.py``), with

* ``endpoints``: ``EndpointInfo`` objects (``.url``, ``.model_name``, ...);
* ``engine_stats``: ``url -> EngineStats`` scraped from each engine's ``/metrics`` every
  ``engine_scrape_interval`` seconds: ``num_running_requests`` (``vllm:num_requests_running``),
  ``num_queuing_requests`` (``vllm:num_requests_waiting``), ``gpu_cache_usage_perc``
  (``vllm:gpu_cache_usage_perc``; vLLM V1 exports ``vllm:kv_cache_usage_perc``, read here when
  the stats object has ``kv_cache_usage_perc``), ``gpu_prefix_cache_hit_rate`` ...;
* ``request_stats``: ``url -> RequestStats`` the router keeps itself: ``qps``, ``ttft``,
  ``in_prefill_requests`` (routed, no first token yet), ``in_decoding_requests``,
  ``finished_requests``, ``avg_latency`` ...;
* ``request``: the incoming FastAPI request (its JSON body is passed as ``request_json`` by the
  routing logics that read it, e.g. the session router).

:class:`PolicyRoutingLogic` has that method. It turns the stats into the exported policy's
features (``schema.json``) and asks :class:`~llm_cluster_env.deploy.router_runtime.ExportedRouter`:

=====================  ===================================================================
feature                how it is obtained here
=====================  ===================================================================
``queued``             ``EngineStats.num_queuing_requests`` (as of the last scrape)
``running``            ``EngineStats.num_running_requests``
``kv_usage``           ``kv_cache_usage_perc`` if the stats have it, else
                       ``gpu_cache_usage_perc``
``prefill_tokens_k``   **approximate**: prompt tokens of the requests this router sent there
                       that have no first token yet (:meth:`~PolicyRoutingLogic.on_first_token`);
                       a partly prefilled chunked prompt counts whole. Without the progress
                       hooks: ``RequestStats.in_prefill_requests`` x the mean prompt routed.
``decode_tokens_k``    ``max(0, (queued + running) * mean_output_tokens - generated)``, with
                       ``generated`` the tokens streamed so far by the requests in flight there
                       (:meth:`~PolicyRoutingLogic.on_tokens`; 0 without the hooks, which
                       overestimates)
``dispatch_share``     exact: this router's last ``dispatch_share_window`` dispatches
``speed_k``,           static, from :class:`EndpointHardware` (profiling, or the simulator's
``kv_capacity_k``      value for the same GPU/model in ``schema.json`` ``reference_hardware``)
``est_wait_s``,        **approximate** (the simulator's engine model needs every request's
``est_ttft_s``,        progress and the iteration-time model): with ``P`` the prefill tokens
``est_delta_s``        ahead, ``p`` the prompt, ``B`` the running requests, ``r`` the
                       endpoint's prefill throughput and ``t_d = 32 / (1000 * speed_k)`` the
                       decode iteration at the reference batch: ``wait = P / r``,
                       ``ttft = wait + p / r``, ``delta = ttft + (E[O] - 1) * t_d + B * p / r``
``req/prompt_tokens_k``  ``count_prompt_tokens(request_json)`` (default: the length of
                       ``prompt_token_ids``, else ~4 characters per token of the prompt or
                       messages: pass a tokenizer for exact counts)
``global/arrival_rate``  exact: the simulator's decayed estimator over this router's arrivals
=====================  ===================================================================

Features it cannot compute (the prefix-cache group, oracle lengths) must come from
``extra_features(url, request_json) -> {feature: value}``, or construction fails naming them.
Only the numpy + onnxruntime runtime is needed (the export folder holds both modules).
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

try:  # inside the package, or copied next to router_runtime.py in an export folder
    from llm_cluster_env.deploy.router_runtime import ExportedRouter, RouterInputError
except ImportError:  # pragma: no cover - the copied layout
    from router_runtime import ExportedRouter, RouterInputError  # type: ignore[no-redef]

#: Decode batch and context of ``speed_k`` (see :mod:`llm_cluster_env.env.observation`).
REFERENCE_BATCH = 32
#: The arrival-rate estimate looks at no less than this fraction of its time constant (as in
#: :mod:`llm_cluster_env.env.observation`).
MIN_RATE_WINDOW_FRACTION = 0.1
#: Features this adapter computes from engine and request stats.
COMPUTED_REPLICA_FEATURES = ("queued", "running", "kv_usage", "prefill_tokens_k",
                             "decode_tokens_k", "dispatch_share", "speed_k", "kv_capacity_k",
                             "est_wait_s", "est_ttft_s", "est_delta_s")
COMPUTED_REQUEST_FEATURES = ("req/prompt_tokens_k", "global/arrival_rate")


@dataclass(frozen=True)
class EndpointHardware:
    """What an endpoint's GPU and model can do (static).

    :param speed_k: decode throughput at the reference batch (32 requests x 1,024 context
        tokens), 1k tokens/s.
    :param kv_capacity_k: KV-cache capacity, 1k tokens (``num_gpu_blocks * block_size / 1000``
        of ``vllm:cache_config_info``).
    :param prefill_tokens_per_s: prefill throughput (tokens/s), for the engine-model estimates.
    """

    speed_k: float
    kv_capacity_k: float
    prefill_tokens_per_s: float

    def __post_init__(self) -> None:
        for name in ("speed_k", "kv_capacity_k", "prefill_tokens_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"EndpointHardware.{name}={value!r}: must be a finite number "
                                 "> 0")


class ArrivalRateEstimator:
    """The simulator's exponentially decayed arrival rate (requests/s), time constant ``tau``
    seconds (``ObservationBuilder.arrival_rate`` of :mod:`llm_cluster_env.env.observation`)."""

    def __init__(self, tau: float) -> None:
        if not tau > 0:
            raise ValueError(f"arrival_rate_timescale_s={tau!r}: must be > 0 seconds")
        self.tau = float(tau)
        self._decayed = 0.0
        self._first: float | None = None
        self._last = 0.0

    def record(self, t: float) -> None:
        """An arrival at ``t`` seconds."""
        if self._first is None:
            self._first = t
        else:
            self._decayed *= math.exp(-(t - self._last) / self.tau)
        self._decayed += 1.0
        self._last = t

    def rate(self) -> float:
        """The estimate as of the last arrival."""
        if self._first is None:
            return 0.0
        elapsed = self._last - self._first
        if elapsed <= 0.0 and self._decayed <= 1.0:
            return 0.0
        window = max(elapsed, MIN_RATE_WINDOW_FRACTION * self.tau)
        return self._decayed / (self.tau * -math.expm1(-window / self.tau))


@dataclass
class _InFlight:
    prompt_tokens: int
    first_token: bool = False
    generated: int = 0


def approximate_prompt_tokens(request_json: Mapping[str, Any] | None) -> int:
    """Prompt tokens of an OpenAI-style request body: ``len(prompt_token_ids)`` when given,
    else about one token per 4 characters of ``prompt`` or of the ``messages``' contents."""
    body = request_json or {}
    ids = body.get("prompt_token_ids")
    if ids is not None:
        return len(ids)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        prompt = " ".join(map(str, prompt))
    text = prompt if isinstance(prompt, str) else " ".join(
        str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, Mapping))
    return max(1, math.ceil(len(text) / 4))


class PolicyRoutingLogic:
    """Routes with an exported policy behind production-stack's ``route_request``.

    :param router: the exported router (``ExportedRouter.load(export_dir)``).
    :param hardware: ``url -> EndpointHardware``; the key ``"*"`` covers every other url. A
        flat (fixed-size) policy needs exactly its replicas' urls, in its training order.
    :param mean_output_tokens: expected output length (tokens) of the workload, from history.
    :param count_prompt_tokens: ``request_json -> prompt tokens``.
    :param extra_features: ``(url, request_json) -> {feature: value}`` for the policy's
        features this class does not compute (prefix features); its values override.
    :param progress_hooks: whether the deployment calls :meth:`on_first_token`,
        :meth:`on_tokens` and :meth:`on_request_complete`; without them the prefill backlog
        comes from ``RequestStats.in_prefill_requests``.
    :param clock: seconds, monotonic.
    """

    def __init__(self, router: ExportedRouter, hardware: Mapping[str, EndpointHardware], *,
                 mean_output_tokens: float,
                 count_prompt_tokens: Callable[[Mapping[str, Any] | None], int]
                 = approximate_prompt_tokens,
                 extra_features: Callable[[str, Mapping[str, Any] | None],
                                          Mapping[str, float]] | None = None,
                 progress_hooks: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(mean_output_tokens) and mean_output_tokens >= 1):
            raise ValueError(f"mean_output_tokens={mean_output_tokens!r}: must be >= 1 token")
        if not hardware:
            raise ValueError("hardware: needs one EndpointHardware per url (or '*')")
        for url, hw in hardware.items():
            if not isinstance(hw, EndpointHardware):
                raise ValueError(f"hardware[{url!r}]: expected an EndpointHardware, got "
                                 f"{type(hw).__name__}")
        uncomputed = [f for f in router.replica_features if f not in COMPUTED_REPLICA_FEATURES]
        uncomputed += [f for f in router.request_features
                       if f not in COMPUTED_REQUEST_FEATURES and not f.startswith("hist/")]
        if uncomputed and extra_features is None:
            raise ValueError(f"the policy reads {uncomputed}, which this adapter cannot compute "
                             "from engine and request stats: pass extra_features=")
        if router.fixed_replicas is not None and (
                "*" in hardware or len(hardware) != router.fixed_replicas):
            raise ValueError(f"hardware: a flat policy routes exactly {router.fixed_replicas} "
                             f"endpoints: list each url, in its training order (got "
                             f"{list(hardware)})")
        state = router.schema.get("router_state", {})
        self.router = router
        self.hardware = dict(hardware)
        self.mean_output_tokens = float(mean_output_tokens)
        self.count_prompt_tokens = count_prompt_tokens
        self.extra_features = extra_features
        self.progress_hooks = bool(progress_hooks)
        self.clock = clock
        self.share_window = int(state.get("dispatch_share_window", 64))
        self.arrivals = ArrivalRateEstimator(float(state.get("arrival_rate_timescale_s", 10.0)))
        self._recent: deque[str] = deque()
        self._recent_counts: dict[str, int] = {}
        self._in_flight: dict[str, dict[str, _InFlight]] = {}
        self._prompts_routed = 0
        self._prompt_tokens_routed = 0
        #: The request id of the last routed request (the ``x-request-id`` header or a new id).
        self.last_request_id: str | None = None
        #: The features of the last decision (url -> per-replica features, and the request's).
        self.last_features: dict[str, Any] = {}

    # ------------------------------------------------------------------ hooks
    def on_first_token(self, url: str, request_id: str) -> None:
        """The request's first token arrived (its prefill is done)."""
        entry = self._in_flight.get(url, {}).get(request_id)
        if entry is not None:
            entry.first_token = True

    def on_tokens(self, url: str, request_id: str, count: int = 1) -> None:
        """``count`` more output tokens of the request were streamed."""
        entry = self._in_flight.get(url, {}).get(request_id)
        if entry is not None:
            entry.first_token = True
            entry.generated += int(count)

    def on_request_complete(self, url: str, request_id: str) -> None:
        """The request finished (or failed): it no longer loads the endpoint."""
        self._in_flight.get(url, {}).pop(request_id, None)

    # ------------------------------------------------------------------ features
    def _hardware(self, url: str) -> EndpointHardware:
        hw = self.hardware.get(url) or self.hardware.get("*")
        if hw is None:
            raise RouterInputError(f"endpoint {url}: no EndpointHardware (known: "
                                   f"{sorted(self.hardware)})")
        return hw

    def replica_features(self, url: str, engine: Any, requests: Any, prompt_tokens: int
                         ) -> dict[str, float]:
        """The per-replica features of endpoint ``url`` for a request of ``prompt_tokens``."""
        if engine is None:
            raise RouterInputError(f"endpoint {url}: no engine stats (not scraped yet, or the "
                                   "scrape failed)")
        hw = self._hardware(url)
        queued = float(engine.num_queuing_requests)
        running = float(engine.num_running_requests)
        usage = getattr(engine, "kv_cache_usage_perc", None)
        if usage is None:
            usage = engine.gpu_cache_usage_perc
        in_flight = self._in_flight.get(url, {})
        if self.progress_hooks:
            prefill = sum(r.prompt_tokens for r in in_flight.values() if not r.first_token)
            generated = sum(r.generated for r in in_flight.values())
        else:
            mean_prompt = (self._prompt_tokens_routed / self._prompts_routed
                           if self._prompts_routed else 0.0)
            waiting = getattr(requests, "in_prefill_requests", 0) if requests is not None else 0
            prefill = max(float(waiting), 0.0) * mean_prompt
            generated = 0
        decode = max(0.0, (queued + running) * self.mean_output_tokens - generated)
        rate = hw.prefill_tokens_per_s
        decode_step = REFERENCE_BATCH / (1000.0 * hw.speed_k)
        wait = prefill / rate
        ttft = wait + prompt_tokens / rate
        delta = ttft + (self.mean_output_tokens - 1.0) * decode_step + running * prompt_tokens \
            / rate
        return {
            "queued": queued, "running": running, "kv_usage": float(usage),
            "prefill_tokens_k": prefill / 1000.0, "decode_tokens_k": decode / 1000.0,
            "dispatch_share": self._recent_counts.get(url, 0) / max(len(self._recent), 1),
            "speed_k": hw.speed_k, "kv_capacity_k": hw.kv_capacity_k,
            "est_wait_s": wait, "est_ttft_s": ttft, "est_delta_s": delta,
        }

    # ------------------------------------------------------------------ routing
    def route_request(self, endpoints: Sequence[Any], engine_stats: Mapping[str, Any],
                      request_stats: Mapping[str, Any], request: Any,
                      request_json: Mapping[str, Any] | None = None, *,
                      request_id: str | None = None) -> str:
        """The url of the endpoint for ``request`` (production-stack's signature; the
        request's JSON body as ``request_json``). Records the arrival and the dispatch under
        ``request_id`` (default: the ``X-Request-Id`` header, else a new id), the id the
        progress hooks name."""
        if not endpoints:
            raise RouterInputError("endpoints: no endpoint to route to")
        urls = [e.url for e in endpoints]
        if self.router.fixed_replicas is not None:
            order = list(self.hardware)
            if sorted(urls) != sorted(order):
                raise RouterInputError(f"endpoints {urls}: this flat policy routes exactly "
                                       f"{order}")
            urls = order
        now = self.clock()
        self.arrivals.record(now)
        prompt = int(self.count_prompt_tokens(request_json))
        rows = []
        for url in urls:
            row = self.replica_features(url, engine_stats.get(url), request_stats.get(url),
                                        prompt)
            if self.extra_features is not None:
                row.update(self.extra_features(url, request_json))
            rows.append({f: row[f] for f in self.router.replica_features})
        features = {"req/prompt_tokens_k": prompt / 1000.0,
                    "global/arrival_rate": self.arrivals.rate()}
        if self.extra_features is not None:
            extra = self.extra_features("", request_json)
            features.update({k: v for k, v in extra.items() if k in self.router.request_features})
        request_row = {f: features[f] for f in self.router.request_features}
        chosen = urls[self.router.route(rows, request_row)]
        self.last_features = {"replicas": dict(zip(urls, rows)), "request": request_row}
        self._record_dispatch(chosen, prompt, request, request_id)
        return chosen

    def _record_dispatch(self, url: str, prompt: int, request: Any,
                         request_id: str | None) -> None:
        self._recent.append(url)
        self._recent_counts[url] = self._recent_counts.get(url, 0) + 1
        if len(self._recent) > self.share_window:
            old = self._recent.popleft()
            self._recent_counts[old] -= 1
        if request_id is None:
            headers = getattr(request, "headers", None) or {}
            request_id = headers.get("x-request-id") if hasattr(headers, "get") else None
        request_id = str(request_id) if request_id else uuid.uuid4().hex
        self._in_flight.setdefault(url, {})[request_id] = _InFlight(prompt)
        self._prompts_routed += 1
        self._prompt_tokens_routed += prompt
        self.last_request_id = request_id


__all__ = ["ArrivalRateEstimator", "EndpointHardware", "PolicyRoutingLogic",
           "approximate_prompt_tokens"]
