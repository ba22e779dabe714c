"""An exported router in the shape of vLLM production-stack's routing interface.

vLLM production-stack's router (``vllm_router``) calls
``route_request(endpoints, engine_stats, request_stats, request) -> url`` on its routing logic
(``RoutingInterface`` in ``vllm_router/routers/routing_logic.py``), with

* ``endpoints``: ``EndpointInfo`` objects (``.url``, ``.model_names``, ``.model_label``, ...);
* ``engine_stats``: ``url -> EngineStats`` scraped from each engine's ``/metrics`` every
  ``--engine-stats-interval`` seconds: ``num_running_requests`` (``vllm:num_requests_running``),
  ``num_queuing_requests`` (``vllm:num_requests_waiting``), ``gpu_cache_usage_perc``
  (``vllm:gpu_cache_usage_perc``, which vLLM V1 no longer exports: unpatched, it reads 0.0).
  ``deploy/production_stack/learned_router.patch`` adds ``kv_cache_usage_perc``: the V1
  ``vllm:kv_cache_usage_perc``, else the old name, else ``None`` (the engine exports neither);
  an endpoint not scraped yet (or whose scrape failed) has no entry;
* ``request_stats``: ``url -> RequestStats`` the router keeps itself (``in_prefill_requests``
  ...);
* ``request``: the incoming FastAPI request, its JSON body passed as ``request_json``.

:class:`PolicyRoutingLogic` has that method. It turns the stats into the exported policy's
features (``schema.json``) and asks :class:`~llm_cluster_env.deploy.router_runtime.ExportedRouter`:

=====================  ===================================================================
feature                how it is obtained here
=====================  ===================================================================
``queued``             ``EngineStats.num_queuing_requests`` (as of the last scrape)
``running``            ``EngineStats.num_running_requests``
``kv_usage``           ``EngineStats.kv_cache_usage_perc`` (patched production-stack); on an
                       unpatched one (no such field) ``gpu_cache_usage_perc``
``prefill_tokens_k``   **approximate**: prompt tokens of the requests this router sent there
                       that have no first token yet (:meth:`~PolicyRoutingLogic.on_chunk`,
                       :meth:`~PolicyRoutingLogic.on_first_token`); a partly prefilled chunked
                       prompt counts whole. Without the progress hooks:
                       ``RequestStats.in_prefill_requests`` x the mean prompt routed.
``decode_tokens_k``    ``max(0, (queued + running) * mean_output_tokens - generated)``, with
                       ``generated`` the tokens streamed so far by the requests in flight there
                       (:meth:`~PolicyRoutingLogic.on_chunk` counts one token per server-sent
                       ``data:`` event; 0 without the hooks or for non-streamed responses,
                       which overestimates)
``dispatch_share``     exact: this router's last ``dispatch_share_window`` dispatches (per
                       router process: with several router replicas each keeps its own)
``speed_k``,           static, from :class:`EndpointHardware` per endpoint url, else per
``kv_capacity_k``      ``model_label``, else the default (profiling, or the simulator's value
                       for the same GPU/model in ``schema.json`` ``reference_hardware``)
``est_wait_s``,        **approximate** (the simulator's engine model needs every request's
``est_ttft_s``,        progress and the iteration-time model): with ``P`` the prefill tokens
``est_delta_s``        ahead, ``p`` the prompt, ``B`` the running requests, ``r`` the
                       endpoint's prefill throughput and ``t_d = 32 / (1000 * speed_k)`` the
                       decode iteration at the reference batch: ``wait = P / r``,
                       ``ttft = wait + p / r``, ``delta = ttft + (E[O] - 1) * t_d + B * p / r``
``req/prompt_tokens_k``  ``count_prompt_tokens(request_json)`` (default: the length of
                       ``prompt_token_ids``, else ~4 characters per token of the prompt or
                       messages: pass a tokenizer for exact counts)
``global/arrival_rate``  the simulator's decayed estimator over this router's arrivals, times
                       ``router_replicas`` (router processes sharing the traffic evenly)
=====================  ===================================================================

Features it cannot compute (the prefix-cache group, oracle lengths) must come from
``extra_features(url, request_json) -> {feature: value}``, or construction fails naming them.

Robustness (what production traffic does to a router):

* **Endpoints without usable stats** (not scraped yet, scrape failed, a gauge missing, ``None``,
  negative or not finite, KV usage above 1 or exported under neither name) are never failed: a
  replica-set policy routes among the endpoints that have stats; when none has (or a flat
  policy is given other endpoints than its own, or lacks stats for one) the request goes to the
  endpoint with the fewest requests this router has in flight there (ties: fewer recent
  dispatches, then the order given). Each such endpoint is logged once (``logging``, naming the
  url and field) until it has stats. An endpoint with no ``EndpointHardware`` (by url, label or
  default) is a configuration error, raised.
* **Retries** (production-stack's failover re-route): ``route_request(..., failed_url=url)``
  routes the same request again without recording a second arrival, and moves its dispatch
  from the failed endpoint to the new one.
* **Stale endpoints**: an endpoint missing from ``known_urls`` (default: the endpoints given) is
  forgotten: its dispatches leave the share window and its in-flight requests are dropped.
* **Duplicate urls** among the endpoints are refused; errors name the endpoint url and the
  field (the runtime's ``replica i`` is translated).
* **Request ids**: the hooks name a request by the id passed as ``request_id`` (production-stack's
  own, from ``X-Request-Id`` or a new uuid), else the ``X-Request-Id`` header; a request
  with neither is routed but not tracked in flight (no hook could name it, so nothing leaks).

``features_log`` (a path) appends one JSON line per decision (``event: route``: the endpoints in
policy order, their features, the request features, the probabilities, the choice or the
fallback, the requests in flight) and per completion (``event: complete``), and one
``event: close`` line with what is still in flight when :meth:`PolicyRoutingLogic.close` is
called. Only the numpy + onnxruntime runtime is needed (the export folder holds both modules).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # inside the package, or copied next to router_runtime.py in an export folder
    from llm_cluster_env.deploy.router_runtime import ExportedRouter, RouterInputError
except ImportError:  # pragma: no cover - the copied layout
    from router_runtime import ExportedRouter, RouterInputError  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

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
#: ``EngineStats`` gauge -> the vLLM metric it is scraped from.
ENGINE_GAUGES = {"num_queuing_requests": "vllm:num_requests_waiting",
                 "num_running_requests": "vllm:num_requests_running",
                 "kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
                 "gpu_cache_usage_perc": "vllm:gpu_cache_usage_perc"}
_MISSING = object()


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
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and math.isfinite(value) and value > 0):
                raise ValueError(f"EndpointHardware.{name}={value!r}: must be a finite number "
                                 "> 0")

    @classmethod
    def from_mapping(cls, where: str, value: Any) -> EndpointHardware:
        """From ``{speed_k, kv_capacity_k, prefill_tokens_per_s}``; errors name ``where``."""
        names = ("speed_k", "kv_capacity_k", "prefill_tokens_per_s")
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}={value!r}: expected a mapping with {list(names)}")
        missing = [n for n in names if n not in value]
        unknown = sorted(set(value) - set(names))
        if missing or unknown:
            raise ValueError(f"{where}: missing {missing}, unknown {unknown} (expected "
                             f"{list(names)})")
        try:
            return cls(**{n: value[n] for n in names})
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@dataclass(frozen=True)
class LearnedRouterConfig:
    """Everything the learned router in production-stack needs, validated once
    (:func:`load_router_config`).

    :param export_dir: the export folder (``train/export.py RUN --out DIR``).
    :param mean_output_tokens: expected output length of the workload (tokens), from history.
    :param hardware: ``url -> EndpointHardware`` (in a flat policy's training order).
    :param label_hardware: ``model_label -> EndpointHardware`` for endpoints not listed by url.
    :param default_hardware: for every other endpoint (``None``: such an endpoint is an error).
    :param features_log: JSONL file of every decision (``None``: none).
    :param router_replicas: router processes sharing the traffic evenly; the arrival rate one
        observes is multiplied by it.
    """

    export_dir: Path
    mean_output_tokens: float
    hardware: Mapping[str, EndpointHardware] = field(default_factory=dict)
    label_hardware: Mapping[str, EndpointHardware] = field(default_factory=dict)
    default_hardware: EndpointHardware | None = None
    features_log: Path | None = None
    router_replicas: int = 1


#: Keys of the learned router's configuration file.
CONFIG_KEYS = ("export_dir", "mean_output_tokens", "hardware", "features_log", "router_replicas")
HARDWARE_KEYS = ("endpoints", "labels", "default")


def load_router_config(path: str | Path | None = None, *, export_dir: str | Path | None = None,
                       mean_output_tokens: float | None = None,
                       features_log: str | Path | None = None) -> LearnedRouterConfig:
    """The learned router's configuration from a YAML or JSON file (keys :data:`CONFIG_KEYS`;
    ``hardware`` has ``endpoints: {url: hw}``, ``labels: {model_label: hw}`` and ``default: hw``
    with ``hw = {speed_k, kv_capacity_k, prefill_tokens_per_s}``) and/or command-line values,
    which override the file's. One ``ValueError`` naming the file, key and value otherwise."""
    raw: dict[str, Any] = {}
    where = "learned router config"
    if path is not None:
        where = str(path)
        text = Path(path).read_text(encoding="utf-8")
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            try:
                raw = yaml.safe_load(text) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                raise ValueError(f"{where}: not valid YAML{at}") from None
        else:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON (line {err.lineno}, column "
                                 f"{err.colno}: {err.msg})") from None
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: expected a mapping of {list(CONFIG_KEYS)}")
        unknown = sorted(set(raw) - set(CONFIG_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (expected {list(CONFIG_KEYS)})")
        raw = dict(raw)
    for key, value in (("export_dir", export_dir), ("mean_output_tokens", mean_output_tokens),
                       ("features_log", features_log)):
        if value is not None:
            raw[key] = value
    if raw.get("export_dir") is None:
        raise ValueError(f"{where}: export_dir is not set (--learned-router-export DIR or "
                         "export_dir: in the file)")
    folder = Path(raw["export_dir"])
    if not (folder / "schema.json").is_file():
        raise ValueError(f"{where}: export_dir={str(folder)!r}: no schema.json there (not an "
                         "export folder)")
    mean = raw.get("mean_output_tokens")
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not (
            math.isfinite(mean) and mean >= 1):
        raise ValueError(f"{where}: mean_output_tokens={mean!r}: must be a number >= 1 "
                         "(tokens)")
    replicas = raw.get("router_replicas", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"{where}: router_replicas={replicas!r}: must be an integer >= 1")
    hw = raw.get("hardware")
    if not isinstance(hw, Mapping) or not hw:
        raise ValueError(f"{where}: hardware={hw!r}: expected a mapping with some of "
                         f"{list(HARDWARE_KEYS)}")
    unknown = sorted(set(hw) - set(HARDWARE_KEYS))
    if unknown:
        raise ValueError(f"{where}: hardware: unknown key(s) {unknown} (expected "
                         f"{list(HARDWARE_KEYS)})")
    tables = {}
    for key in ("endpoints", "labels"):
        entries = hw.get(key) or {}
        if not isinstance(entries, Mapping):
            raise ValueError(f"{where}: hardware.{key}={entries!r}: expected a mapping")
        tables[key] = {str(name): EndpointHardware.from_mapping(
            f"{where}: hardware.{key}[{name!r}]", value) for name, value in entries.items()}
    default = hw.get("default")
    log = raw.get("features_log")
    return LearnedRouterConfig(
        export_dir=folder, mean_output_tokens=float(mean), hardware=tables["endpoints"],
        label_hardware=tables["labels"],
        default_hardware=None if default is None else EndpointHardware.from_mapping(
            f"{where}: hardware.default", default),
        features_log=None if log is None else Path(log), router_replicas=replicas)


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


def _gauge(url: str, stats: Any, name: str, kind: str = "EngineStats") -> float:
    value = getattr(stats, name, _MISSING)
    if value is _MISSING:
        raise RouterInputError(f"endpoint {url}: {kind} has no field {name!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise RouterInputError(f"endpoint {url}: {kind}.{name}={value!r}: must be a finite "
                               "number >= 0")
    return float(value)


def engine_gauges(url: str, engine: Any) -> tuple[float, float, float]:
    """``(queued, running, kv_usage)`` of endpoint ``url``'s ``EngineStats``;
    :class:`RouterInputError` naming the url and the field when they are missing or unusable."""
    if engine is None:
        raise RouterInputError(f"endpoint {url}: no engine stats (not scraped yet, or the "
                               "scrape failed)")
    queued = _gauge(url, engine, "num_queuing_requests")
    running = _gauge(url, engine, "num_running_requests")
    if getattr(engine, "kv_cache_usage_perc", _MISSING) is None:
        raise RouterInputError(f"endpoint {url}: EngineStats.kv_cache_usage_perc=None: the "
                               "engine exports neither vllm:kv_cache_usage_perc nor "
                               "vllm:gpu_cache_usage_perc")
    name = "kv_cache_usage_perc" if hasattr(engine, "kv_cache_usage_perc") \
        else "gpu_cache_usage_perc"
    usage = _gauge(url, engine, name)
    if usage > 1.0:
        raise RouterInputError(f"endpoint {url}: EngineStats.{name}={usage!r}: must be a "
                               "fraction <= 1 (vLLM exports KV usage as a fraction)")
    return queued, running, usage


class PolicyRoutingLogic:
    """Routes with an exported policy behind production-stack's ``route_request``.

    :param router: the exported router (``ExportedRouter.load(export_dir)``).
    :param hardware: ``url -> EndpointHardware``; the key ``"*"`` covers every endpoint not
        listed (by url or label). A flat (fixed-size) policy needs exactly its replicas' urls,
        in its training order.
    :param mean_output_tokens: expected output length (tokens) of the workload, from history.
    :param label_hardware: ``model_label -> EndpointHardware`` for endpoints not in ``hardware``.
    :param count_prompt_tokens: ``request_json -> prompt tokens``.
    :param extra_features: ``(url, request_json) -> {feature: value}`` for the policy's
        features this class does not compute (prefix features); its values override.
    :param progress_hooks: whether the deployment calls :meth:`on_chunk` (or
        :meth:`on_first_token`, :meth:`on_tokens`) and :meth:`on_request_complete`; without
        them the prefill backlog comes from ``RequestStats.in_prefill_requests``.
    :param router_replicas: router processes sharing the traffic evenly (the observed arrival
        rate is multiplied by it).
    :param features_log: append a JSON line per decision and completion to this file.
    :param clock: seconds, monotonic.
    """

    def __init__(self, router: ExportedRouter, hardware: Mapping[str, EndpointHardware], *,
                 mean_output_tokens: float,
                 label_hardware: Mapping[str, EndpointHardware] | None = None,
                 count_prompt_tokens: Callable[[Mapping[str, Any] | None], int]
                 = approximate_prompt_tokens,
                 extra_features: Callable[[str, Mapping[str, Any] | None],
                                          Mapping[str, float]] | None = None,
                 progress_hooks: bool = True, router_replicas: int = 1,
                 features_log: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(mean_output_tokens) and mean_output_tokens >= 1):
            raise ValueError(f"mean_output_tokens={mean_output_tokens!r}: must be >= 1 token")
        label_hardware = dict(label_hardware or {})
        if not hardware and not label_hardware:
            raise ValueError("hardware: needs one EndpointHardware per url, label or '*'")
        for where, table in (("hardware", hardware), ("label_hardware", label_hardware)):
            for key, hw in table.items():
                if not isinstance(hw, EndpointHardware):
                    raise ValueError(f"{where}[{key!r}]: expected an EndpointHardware, got "
                                     f"{type(hw).__name__}")
        if not (isinstance(router_replicas, int) and router_replicas >= 1):
            raise ValueError(f"router_replicas={router_replicas!r}: must be an integer >= 1")
        uncomputed = [f for f in router.replica_features if f not in COMPUTED_REPLICA_FEATURES]
        uncomputed += [f for f in router.request_features
                       if f not in COMPUTED_REQUEST_FEATURES and not f.startswith("hist/")]
        if uncomputed and extra_features is None:
            raise ValueError(f"the policy reads {uncomputed}, which this adapter cannot compute "
                             "from engine and request stats: pass extra_features=")
        if router.fixed_replicas is not None and (
                "*" in hardware or label_hardware or len(hardware) != router.fixed_replicas):
            raise ValueError(f"hardware: a flat policy routes exactly {router.fixed_replicas} "
                             f"endpoints: list each url, in its training order (got "
                             f"{list(hardware)}, labels {list(label_hardware)})")
        state = router.schema.get("router_state", {})
        self.router = router
        self.hardware = dict(hardware)
        self.label_hardware = label_hardware
        self.mean_output_tokens = float(mean_output_tokens)
        self.count_prompt_tokens = count_prompt_tokens
        self.extra_features = extra_features
        self.progress_hooks = bool(progress_hooks)
        self.router_replicas = router_replicas
        self.clock = clock
        self.share_window = int(state.get("dispatch_share_window", 64))
        self.arrivals = ArrivalRateEstimator(float(state.get("arrival_rate_timescale_s", 10.0)))
        self._recent: deque[tuple[str | None, str]] = deque()  # (request id, url)
        self._recent_counts: dict[str, int] = {}
        self._in_flight: dict[str, dict[str, _InFlight]] = {}
        self._prompts_routed = 0
        self._prompt_tokens_routed = 0
        self._without_stats: dict[str, str] = {}
        self._mismatch_logged: str | None = None
        self._log = None if features_log is None else open(  # noqa: SIM115 - closed in close()
            features_log, "a", encoding="utf-8", buffering=1)
        #: The request id of the last routed request (``None``: untracked).
        self.last_request_id: str | None = None
        #: The features of the last decision (url -> per-replica features, and the request's).
        self.last_features: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: LearnedRouterConfig, **kwargs: Any) -> PolicyRoutingLogic:
        """The routing logic of a validated :class:`LearnedRouterConfig`."""
        hardware = dict(config.hardware)
        if config.default_hardware is not None:
            hardware["*"] = config.default_hardware
        return cls(ExportedRouter.load(config.export_dir), hardware,
                   mean_output_tokens=config.mean_output_tokens,
                   label_hardware=config.label_hardware,
                   router_replicas=config.router_replicas,
                   features_log=config.features_log, **kwargs)

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

    def on_chunk(self, url: str, request_id: str, chunk: bytes) -> None:
        """A chunk of the response body arrived from the engine (production-stack streams
        bytes, not tokens): the first marks the first token; each server-sent ``data:`` event
        but ``[DONE]`` counts as one generated token (vLLM streams one event per step; a
        non-streamed JSON body counts none)."""
        entry = self._in_flight.get(url, {}).get(request_id)
        if entry is not None:
            entry.first_token = True
            entry.generated += max(0, chunk.count(b"data:") - chunk.count(b"[DONE]"))

    def on_request_complete(self, url: str, request_id: str) -> None:
        """The request finished (or failed): it no longer loads the endpoint."""
        table = self._in_flight.get(url)
        if table is not None and table.pop(request_id, None) is not None:
            if not table:
                del self._in_flight[url]
            self._write({"event": "complete", "request_id": request_id, "url": url,
                         "in_flight": self.in_flight_count()})

    def in_flight_count(self) -> int:
        """Requests this router routed that have not completed."""
        return sum(len(table) for table in self._in_flight.values())

    def close(self) -> None:
        """Write the ``close`` line (what is still in flight) and close the features log."""
        if self._log is not None:
            self._write({"event": "close", "in_flight": {
                url: sorted(table) for url, table in self._in_flight.items() if table}})
            self._log.close()
            self._log = None

    # ------------------------------------------------------------------ features
    def _hardware(self, url: str, label: str | None) -> EndpointHardware:
        hw = self.hardware.get(url) or (self.label_hardware.get(label) if label else None) \
            or self.hardware.get("*")
        if hw is None:
            raise RouterInputError(f"endpoint {url}: no EndpointHardware for its url or its "
                                   f"model_label {label!r} and no default (urls: "
                                   f"{sorted(self.hardware)}, labels: "
                                   f"{sorted(self.label_hardware)})")
        return hw

    def replica_features(self, url: str, engine: Any, requests: Any, prompt_tokens: int,
                         label: str | None = None) -> dict[str, float]:
        """The per-replica features of endpoint ``url`` (``model_label`` ``label``) for a
        request of ``prompt_tokens``; :class:`RouterInputError` naming the url and field."""
        hw = self._hardware(url, label)
        queued, running, usage = engine_gauges(url, engine)
        in_flight = self._in_flight.get(url, {})
        if self.progress_hooks:
            prefill = sum(r.prompt_tokens for r in in_flight.values() if not r.first_token)
            generated = sum(r.generated for r in in_flight.values())
        else:
            mean_prompt = (self._prompt_tokens_routed / self._prompts_routed
                           if self._prompts_routed else 0.0)
            waiting = 0.0 if requests is None else _gauge(url, requests, "in_prefill_requests",
                                                          "RequestStats")
            prefill = waiting * mean_prompt
            generated = 0
        decode = max(0.0, (queued + running) * self.mean_output_tokens - generated)
        rate = hw.prefill_tokens_per_s
        decode_step = REFERENCE_BATCH / (1000.0 * hw.speed_k)
        wait = prefill / rate
        ttft = wait + prompt_tokens / rate
        delta = ttft + (self.mean_output_tokens - 1.0) * decode_step + running * prompt_tokens \
            / rate
        return {
            "queued": queued, "running": running, "kv_usage": usage,
            "prefill_tokens_k": prefill / 1000.0, "decode_tokens_k": decode / 1000.0,
            "dispatch_share": self._recent_counts.get(url, 0) / max(len(self._recent), 1),
            "speed_k": hw.speed_k, "kv_capacity_k": hw.kv_capacity_k,
            "est_wait_s": wait, "est_ttft_s": ttft, "est_delta_s": delta,
        }

    # ------------------------------------------------------------------ routing
    def route_request(self, endpoints: Sequence[Any], engine_stats: Mapping[str, Any],
                      request_stats: Mapping[str, Any], request: Any,
                      request_json: Mapping[str, Any] | None = None, *,
                      request_id: str | None = None, failed_url: str | None = None,
                      known_urls: Collection[str] | None = None) -> str:
        """The url of the endpoint for ``request`` (production-stack's signature; the
        request's JSON body as ``request_json``).

        :param request_id: the id the progress hooks will name (production-stack's own);
            default: the ``X-Request-Id`` header; neither: the request is not tracked.
        :param failed_url: this is a retry of ``request_id`` after ``failed_url`` failed: no
            new arrival, and the dispatch moves from ``failed_url`` to the new choice.
        :param known_urls: every endpoint that still exists (default: ``endpoints``); the
            others are forgotten. Ignored on a retry.
        """
        if not endpoints:
            raise RouterInputError("endpoints: no endpoint to route to")
        urls = [e.url for e in endpoints]
        if len(set(urls)) != len(urls):
            dup = next(u for u in urls if urls.count(u) > 1)
            raise RouterInputError(f"endpoints: {dup} is listed {urls.count(dup)} times "
                                   "(duplicate endpoint urls are refused)")
        labels = {e.url: getattr(e, "model_label", None) for e in endpoints}
        if failed_url is None:
            self._forget_except(set(urls) if known_urls is None else set(known_urls))
        mismatch = None
        if self.router.fixed_replicas is not None:
            order = list(self.hardware)
            if set(urls) == set(order):
                urls = order
            else:
                mismatch = f"the flat policy routes exactly {order}, not {urls}"
        if request_id is None:
            headers = getattr(request, "headers", None) or {}
            request_id = headers.get("x-request-id") if hasattr(headers, "get") else None
        request_id = str(request_id) if request_id else None
        if failed_url is None:
            self.arrivals.record(self.clock())
        prompt = int(self.count_prompt_tokens(request_json))
        rows, usable = [], []
        for url in [] if mismatch else urls:
            self._hardware(url, labels[url])  # a configuration error: raised
            try:
                row = self.replica_features(url, engine_stats.get(url),
                                            request_stats.get(url), prompt, labels[url])
            except RouterInputError as err:
                if url not in self._without_stats:
                    logger.warning("learned router: %s; routing without it", err)
                self._without_stats[url] = str(err)
                continue
            self._without_stats.pop(url, None)
            if self.extra_features is not None:
                row.update(self.extra_features(url, request_json))
            rows.append({f: row[f] for f in self.router.replica_features})
            usable.append(url)
        features = {"req/prompt_tokens_k": prompt / 1000.0,
                    "global/arrival_rate": self.arrivals.rate() * self.router_replicas}
        if self.extra_features is not None:
            extra = self.extra_features("", request_json)
            features.update({k: v for k, v in extra.items() if k in self.router.request_features})
        request_row = {f: features[f] for f in self.router.request_features}
        record: dict[str, Any] = {"event": "route", "request_id": request_id,
                                  "retry_of": failed_url, "endpoints": usable,
                                  "replicas": rows, "request": request_row}
        if usable and (self.router.fixed_replicas is None or len(usable) == len(urls)):
            try:
                decision = self.router.decide(rows, request_row)
            except RouterInputError as err:
                raise RouterInputError(re.sub(r"^replica (\d+)", lambda m: "endpoint "
                                              + usable[int(m.group(1))], str(err))) from None
            chosen = usable[decision.replica]
            self._mismatch_logged = None
            record["probabilities"] = [float(p) for p in decision.probabilities]
            record["fallback"] = None
        else:
            chosen = min(urls, key=lambda u: (len(self._in_flight.get(u, {})),
                                              self._recent_counts.get(u, 0), urls.index(u)))
            record["fallback"] = (mismatch or f"{len(urls) - len(usable)} of {len(urls)} "
                                  "endpoint(s) without usable stats") + ": fewest in flight"
            if mismatch and mismatch != self._mismatch_logged:
                logger.warning("learned router: %s; routing to the fewest in flight", mismatch)
            self._mismatch_logged = mismatch
        self.last_features = {"replicas": dict(zip(usable, rows)), "request": request_row,
                              "fallback": record["fallback"]}
        self._record_dispatch(chosen, prompt, request_id, failed_url)
        record.update(chosen=chosen, in_flight=self.in_flight_count())
        self._write(record)
        return chosen

    def _forget_except(self, known: set[str]) -> None:
        stale = {u for u in self._recent_counts if u not in known}
        stale.update(u for u in self._in_flight if u not in known)
        if not stale:
            return
        for url in stale:
            self._in_flight.pop(url, None)
            self._recent_counts.pop(url, None)
            self._without_stats.pop(url, None)
        self._recent = deque(entry for entry in self._recent if entry[1] not in stale)

    def _record_dispatch(self, url: str, prompt: int, request_id: str | None,
                         failed_url: str | None) -> None:
        if failed_url is not None:  # a retry: its dispatch moves, its arrival is not new
            entry = (request_id, failed_url)
            if request_id is not None and entry in self._recent:
                self._recent.remove(entry)
                self._drop_count(failed_url)
        else:
            self._prompts_routed += 1
            self._prompt_tokens_routed += prompt
        self._recent.append((request_id, url))
        self._recent_counts[url] = self._recent_counts.get(url, 0) + 1
        if len(self._recent) > self.share_window:
            self._drop_count(self._recent.popleft()[1])
        if request_id is not None:
            self._in_flight.setdefault(url, {})[request_id] = _InFlight(prompt)
        self.last_request_id = request_id

    def _drop_count(self, url: str) -> None:
        self._recent_counts[url] -= 1
        if not self._recent_counts[url]:
            del self._recent_counts[url]

    def _write(self, record: Mapping[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps({"t": self.clock(), **record}) + "\n")


__all__ = ["ArrivalRateEstimator", "CONFIG_KEYS", "ENGINE_GAUGES", "EndpointHardware",
           "LearnedRouterConfig", "PolicyRoutingLogic", "approximate_prompt_tokens",
           "engine_gauges", "load_router_config"]
