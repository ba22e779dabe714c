"""Typed, validated configuration of the cluster, its replicas, the workload and the reward.

Every field is reachable as a keyword argument of ``gym.make("LLMCluster-v0", ...)`` (nested
dataclasses as nested dicts) and from YAML ``env_kwargs``. Build configs with
:func:`EnvConfig.from_kwargs`, which also resolves a named ``scenario`` as the base layer.
Errors name the dotted field path and the offending value (see :mod:`llm_cluster_env.validation`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from llm_cluster_env.hardware import (
    GPUS,
    MODELS,
    kv_cache_blocks,
    servable_request_tokens,
    vidur_kv_cache_blocks,
)
from llm_cluster_env.validation import ConfigError, deep_merge, from_dict, require


@dataclass(frozen=True)
class ReplicaConfig:
    """One model replica: a vLLM-style engine serving one model on ``tensor_parallel`` GPUs.

    :param model: model name from :data:`llm_cluster_env.hardware.MODELS`
        (e.g. ``"llama-2-7b"``, ``"llama-3-8b"``).
    :param gpu: GPU name from :data:`llm_cluster_env.hardware.GPUS` (``"a100"``, ``"h100"``).
    :param tensor_parallel: GPUs per replica (tensor-parallel degree).
    :param max_batch_size: cap on requests in the running batch (vLLM ``max_num_seqs``).
    :param block_size: tokens per KV-cache block (vLLM paged attention).
    :param watermark: fraction of KV blocks that admission keeps free (vLLM ``watermark``).
    :param gpu_memory_utilization: fraction of GPU memory the engine may use (weights, KV cache
        and an activation reserve); the KV cache gets what remains after weights and reserve.
    :param batching: the engine's batching policy (see :mod:`llm_cluster_env.sim.replica`):
        ``"mixed_chunked"`` (today's vLLM: every running request decodes and prompt chunks fill
        the rest of the token budget, in the same iteration), ``"mixed"`` (whole prompts join
        the decodes of the same iteration, no chunking) or ``"vllm_v0"`` (vLLM before chunked
        prefill, as Vidur models it: prefill-only and decode-only batches, padded token budget,
        Vidur's KV-capacity rule and no CPU overhead).
    :param max_num_batched_tokens: per-iteration token budget. ``mixed_chunked``: decode +
        prefill-chunk tokens (default 2048, vLLM V1's latency-oriented default). ``mixed``: prompt
        tokens admitted in one iteration (a longer prompt still runs alone). ``vllm_v0``: the
        padded budget ``len(batch) * longest prompt``; must be at least the model's context
        length, as vLLM v0 requires. Default for both: the model's context length.
    :param num_kv_blocks: override the KV capacity derived from memory (blocks); for tests.
    :param max_model_len: context window the engine serves (tokens; vLLM ``--max-model-len``);
        ``None`` = the model's own. Like vLLM, a replica whose KV cache cannot hold one request
        of this length (above the watermark) is refused: lower this or raise the capacity.
    :param iteration_overhead_s: override the fitted per-iteration CPU overhead (seconds;
        ``vllm_v0`` defaults to 0, as in Vidur).
    :param prefix_caching: keep full KV blocks after use and reuse them for later requests with
        the same prefix (vLLM's automatic prefix caching; see
        :mod:`llm_cluster_env.sim.prefix_cache`). Needs ``mixed_chunked`` or ``mixed``.
    :param host_cache: add the host-memory tier behind the prefix cache: blocks evicted from
        the GPU are kept in host memory and loaded back over PCIe on a hit.
    :param host_cache_gb: host memory for the tier (GB, 1e9 bytes, per replica).
    :param host_pcie_gb_s: host-to-GPU transfer bandwidth (GB/s); 25 GB/s is what pinned
        copies reach on PCIe 4.0 x16 (32 GB/s nominal), the A100's host link.
    """

    model: str = "llama-2-7b"
    gpu: str = "a100"
    tensor_parallel: int = 1
    max_batch_size: int = 128
    block_size: int = 16
    watermark: float = 0.01
    gpu_memory_utilization: float = 0.9
    batching: Literal["mixed_chunked", "mixed", "vllm_v0"] = "mixed_chunked"
    max_num_batched_tokens: int | None = None
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    iteration_overhead_s: float | None = None
    prefix_caching: bool = False
    host_cache: bool = False
    host_cache_gb: float = 128.0
    host_pcie_gb_s: float = 25.0

    def __post_init__(self) -> None:
        require(self.model in MODELS, "model", self.model, f"unknown model (known: {sorted(MODELS)})")
        require(self.gpu in GPUS, "gpu", self.gpu, f"unknown GPU (known: {sorted(GPUS)})")
        require(self.tensor_parallel in (1, 2, 4, 8), "tensor_parallel", self.tensor_parallel,
                "must be 1, 2, 4 or 8")
        require(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "must be >= 1")
        require(self.block_size >= 1, "block_size", self.block_size, "must be >= 1 token")
        require(0.0 <= self.watermark < 0.5, "watermark", self.watermark, "must be in [0, 0.5)")
        require(0.1 <= self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                self.gpu_memory_utilization, "must be in [0.1, 1]")
        if self.max_num_batched_tokens is not None:
            require(self.max_num_batched_tokens >= 16, "max_num_batched_tokens",
                    self.max_num_batched_tokens, "must be >= 16 tokens")
        if self.num_kv_blocks is not None:
            require(self.num_kv_blocks >= 1, "num_kv_blocks", self.num_kv_blocks, "must be >= 1")
        if self.iteration_overhead_s is not None:
            require(self.iteration_overhead_s >= 0, "iteration_overhead_s",
                    self.iteration_overhead_s, "must be >= 0 seconds")
        if self.prefix_caching:
            require(self.batching != "vllm_v0", "prefix_caching", self.prefix_caching,
                    "not available with batching='vllm_v0' (Vidur's vLLM v0 model has no prefix "
                    "cache); use 'mixed_chunked' or 'mixed'")
        if self.host_cache:
            require(self.prefix_caching, "host_cache", self.host_cache,
                    "the host tier extends the prefix cache: set prefix_caching=true")
        require(math.isfinite(self.host_cache_gb) and self.host_cache_gb > 0, "host_cache_gb",
                self.host_cache_gb, "must be a finite size > 0 GB")
        require(math.isfinite(self.host_pcie_gb_s) and self.host_pcie_gb_s > 0, "host_pcie_gb_s",
                self.host_pcie_gb_s, "must be a finite bandwidth > 0 GB/s")
        window = MODELS[self.model].max_model_len
        if self.max_model_len is not None:
            require(16 <= self.max_model_len <= window, "max_model_len", self.max_model_len,
                    f"must be in [16, {window}] tokens ({self.model}'s context window)")
        if self.batching == "vllm_v0" and self.max_num_batched_tokens is not None:
            require(self.max_num_batched_tokens >= self.context_tokens, "max_num_batched_tokens",
                    self.max_num_batched_tokens,
                    f"is below the {self.context_tokens}-token context: with batching='vllm_v0' "
                    "(no chunking) a long prompt could never be scheduled; vLLM v0 refuses this "
                    "too")
        try:
            blocks = self.kv_cache_blocks
        except ValueError as err:  # the weights do not fit on the GPU
            raise ConfigError(f"model={self.model!r}, gpu={self.gpu!r}, tensor_parallel="
                              f"{self.tensor_parallel}: {err}") from None
        servable = servable_request_tokens(blocks, self.block_size, self.watermark,
                                           one_free_block=self.batching == "vllm_v0")
        if servable < self.context_tokens:
            field_name = "num_kv_blocks" if self.num_kv_blocks is not None else "gpu_memory_utilization"
            value = self.num_kv_blocks if self.num_kv_blocks is not None else self.gpu_memory_utilization
            raise ConfigError(
                f"{field_name}={value!r}: the KV cache ({blocks} blocks of {self.block_size} "
                f"tokens, {servable} usable above the watermark) cannot hold one request of the "
                f"{self.context_tokens}-token context window; raise the capacity or set "
                f"max_model_len <= {servable}")

    @property
    def context_tokens(self) -> int:
        """The context window served (tokens): ``max_model_len`` or the model's own."""
        return self.max_model_len or MODELS[self.model].max_model_len

    @property
    def kv_bytes_per_block(self) -> int:
        """Bytes of K and V one KV block holds on each GPU of the replica."""
        return MODELS[self.model].kv_bytes_per_token(self.tensor_parallel) * self.block_size

    @property
    def host_cache_blocks(self) -> int:
        """Blocks the host tier holds: ``host_cache_gb`` over the KV bytes of a block (a
        tensor-parallel replica keeps each GPU's shard, so per GPU)."""
        return int(self.host_cache_gb * 1e9 // (self.kv_bytes_per_block * self.tensor_parallel))

    @property
    def host_seconds_per_block(self) -> float:
        """Time to load one block from host memory (seconds): each GPU of the replica loads
        its shard over its own link."""
        return self.kv_bytes_per_block / (self.host_pcie_gb_s * 1e9)

    @property
    def kv_cache_blocks(self) -> int:
        """KV-cache capacity in blocks: ``num_kv_blocks``, else derived from GPU memory (Vidur's
        rule under ``vllm_v0``, see :mod:`llm_cluster_env.hardware`)."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        rule = vidur_kv_cache_blocks if self.batching == "vllm_v0" else kv_cache_blocks
        return rule(MODELS[self.model], GPUS[self.gpu], self.tensor_parallel, self.block_size,
                    self.gpu_memory_utilization)


@dataclass(frozen=True)
class PhaseConfig:
    """One load phase of a piecewise arrival process.

    :param duration_s: length of the phase (seconds).
    :param qps: mean arrival rate during the phase (requests per second).
    """

    duration_s: float
    qps: float

    def __post_init__(self) -> None:
        require(self.duration_s > 0, "duration_s", self.duration_s, "must be > 0 seconds")
        require(self.qps > 0, "qps", self.qps, "must be > 0 requests/s")


@dataclass(frozen=True)
class MultiTurnConfig:
    """Multi-turn sessions (``WorkloadConfig.prefix="multiturn"``; see
    :mod:`llm_cluster_env.workload.prefix`).

    :param turns_mean: mean requests per session (geometric, >= 1).
    :param turn_gap_s: mean time between consecutive requests of a session (seconds,
        exponential; it includes the reply: the workload is open loop).
    :param system_prompt_tokens: a system prompt every session starts with (tokens; 0 = none).
    :param max_context_tokens: a session ends before a turn whose prompt + output would exceed
        this (tokens); ``None`` = the workload's request cap.
    """

    turns_mean: float = 4.0
    turn_gap_s: float = 60.0
    system_prompt_tokens: int = 0
    max_context_tokens: int | None = None

    def __post_init__(self) -> None:
        require(math.isfinite(self.turns_mean) and self.turns_mean >= 1.0, "turns_mean",
                self.turns_mean, "must be a finite mean >= 1 turn")
        require(math.isfinite(self.turn_gap_s) and self.turn_gap_s > 0, "turn_gap_s",
                self.turn_gap_s, "must be a finite time > 0 seconds")
        require(self.system_prompt_tokens >= 0, "system_prompt_tokens",
                self.system_prompt_tokens, "must be >= 0 tokens")
        if self.max_context_tokens is not None:
            require(self.max_context_tokens >= 2, "max_context_tokens", self.max_context_tokens,
                    "must be >= 2 tokens")


@dataclass(frozen=True)
class SystemPromptConfig:
    """System prompts shared across requests (``WorkloadConfig.prefix="system_prompt"``; see
    :mod:`llm_cluster_env.workload.prefix`).

    :param num_prompts: tenants (applications), each with its own system prompt.
    :param zipf_s: popularity exponent: the tenant of rank ``r`` sends a share proportional to
        ``r ** -zipf_s`` of the requests (0 = uniform).
    :param prompt_tokens_range: inclusive range of the system prompts' lengths (tokens).
    """

    num_prompts: int = 64
    zipf_s: float = 1.0
    prompt_tokens_range: tuple[int, int] = (512, 4096)

    def __post_init__(self) -> None:
        require(self.num_prompts >= 1, "num_prompts", self.num_prompts, "must be >= 1")
        require(math.isfinite(self.zipf_s) and self.zipf_s >= 0, "zipf_s", self.zipf_s,
                "must be a finite exponent >= 0")
        lo, hi = self.prompt_tokens_range
        require(1 <= lo <= hi, "prompt_tokens_range", (lo, hi), "must satisfy 1 <= low <= high")


@dataclass(frozen=True)
class WorkloadConfig:
    """Request arrivals and lengths for one episode.

    :param arrival: ``"poisson"`` (exponential gaps at ``qps``), ``"gamma"`` (gamma gaps with mean
        ``1/qps`` and coefficient of variation ``cv``: bursty when ``cv > 1``), ``"phases"`` (the
        ``phases`` list repeated cyclically, gamma gaps with ``cv`` inside each phase) or
        ``"trace"`` (arrival times replayed from ``trace_path``).
    :param qps: mean arrival rate (requests per second) for ``poisson`` and ``gamma``.
    :param cv: coefficient of variation of inter-arrival gaps (``gamma`` and ``phases``).
    :param phases: load phases for ``arrival="phases"``, cycled until the episode ends.
    :param lengths: ``"fixed"`` (``prompt_tokens``/``output_tokens``), ``"uniform"`` (integers
        drawn from the inclusive ranges), ``"lognormal"`` (``*_lognormal``), ``"empirical"`` (joint samples from the packaged summary
        named by ``empirical``) or ``"trace"`` (rows of ``trace_path``; in order when
        ``arrival="trace"``, sampled with replacement otherwise).
    :param prompt_tokens: prompt length for fixed lengths (tokens).
    :param output_tokens: output length for fixed lengths (tokens).
    :param prompt_tokens_range: inclusive range for uniform prompt lengths (tokens).
    :param output_tokens_range: inclusive range for uniform output lengths (tokens).
    :param prompt_lognormal: ``(median tokens, sigma)`` of log-normal prompt lengths
        (``lengths="lognormal"``): ``round(median * exp(sigma * z))``, ``z`` standard normal,
        at least 1 token; drawn independently of the output length.
    :param output_lognormal: ``(median tokens, sigma)`` of log-normal output lengths.
    :param empirical: name of a packaged length summary (``llm_cluster_env/data/<name>.json``).
    :param trace_path: CSV with columns ``arrived_at,num_prefill_tokens,num_decode_tokens``,
        or a Mooncake JSONL trace (``.jsonl``: arrival, lengths and the prompt's block hashes;
        see :mod:`llm_cluster_env.workload.prefix`).
    :param trace_qps: rescale replayed arrival times to this mean rate; ``None`` keeps the
        trace's own timing.
    :param trace_start: first trace row of an episode; ``None`` draws a random start per episode.
    :param trace_rows: ``(first, end)``: with a random start, every episode's window lies inside
        trace rows ``[first, end)`` (no wrapping), so training and evaluation can use disjoint
        parts of one trace; ``None``: windows start anywhere and wrap around.
    :param max_total_tokens: cap on prompt + output tokens; ``None`` uses the smallest context
        length and KV capacity among the replicas, so every request fits on every replica.
    :param oversize_policy: what happens to a request over the cap: ``"clip"`` (remove the
        excess from prompt and output in proportion to their lengths, each kept >= 1; counted in
        the episode metrics),
        ``"reject"`` (drop it before routing; counted as rejected) or ``"error"`` (fail, naming
        the request).
    :param trace_format: ``"auto"`` (Mooncake JSONL for a ``.jsonl`` path, CSV otherwise),
        ``"csv"`` or ``"mooncake"``.
    :param trace_hash_block_tokens: tokens per ``hash_ids`` block of a Mooncake trace (512 for
        the Mooncake release); any size works, KV blocks straddling two hash blocks belong to
        the later one.
    :param prefix: how synthetic prompts share prefixes: ``"none"``, ``"multiturn"``
        (conversations, ``multiturn``; they set their own arrivals: sessions start as a
        Poisson process so that requests arrive at ``qps``) or ``"system_prompt"`` (shared
        system prompts, ``system_prompt``). Lengths from ``lengths`` are the new part of each
        prompt and its output. A Mooncake trace carries its own prefixes.
    :param multiturn: multi-turn session settings.
    :param system_prompt: shared system prompt settings.
    """

    arrival: Literal["poisson", "gamma", "phases", "trace"] = "poisson"
    qps: float = 5.0
    cv: float = 1.0
    phases: tuple[PhaseConfig, ...] = ()
    lengths: Literal["fixed", "uniform", "empirical", "lognormal", "trace"] = "empirical"
    prompt_tokens: int = 1024
    output_tokens: int = 128
    prompt_tokens_range: tuple[int, int] = (128, 2048)
    output_tokens_range: tuple[int, int] = (16, 512)
    prompt_lognormal: tuple[float, float] = (1024.0, 1.0)
    output_lognormal: tuple[float, float] = (128.0, 1.0)
    empirical: str = "splitwise_conv"
    trace_path: str | None = None
    trace_qps: float | None = None
    trace_start: int | None = None
    trace_rows: tuple[int, int] | None = None
    max_total_tokens: int | None = None
    oversize_policy: Literal["clip", "reject", "error"] = "clip"
    trace_format: Literal["auto", "csv", "mooncake"] = "auto"
    trace_hash_block_tokens: int = 512
    prefix: Literal["none", "multiturn", "system_prompt"] = "none"
    multiturn: MultiTurnConfig = field(default_factory=MultiTurnConfig)
    system_prompt: SystemPromptConfig = field(default_factory=SystemPromptConfig)

    def __post_init__(self) -> None:
        require(self.qps > 0 and math.isfinite(self.qps), "qps", self.qps,
                "must be a finite rate > 0 requests/s")
        require(self.cv > 0 and math.isfinite(self.cv), "cv", self.cv, "must be > 0")
        if self.arrival == "phases":
            require(len(self.phases) > 0, "phases", self.phases,
                    "arrival='phases' needs at least one {duration_s, qps} phase")
        if "trace" in (self.arrival, self.lengths):
            require(self.trace_path is not None, "trace_path", self.trace_path,
                    f"arrival={self.arrival!r}, lengths={self.lengths!r} needs a trace CSV path")
        if self.arrival == "trace":
            require(self.lengths == "trace", "lengths", self.lengths,
                    "arrival='trace' replays the trace's own lengths: set lengths='trace'")
        require(self.prompt_tokens >= 1, "prompt_tokens", self.prompt_tokens, "must be >= 1")
        require(self.output_tokens >= 1, "output_tokens", self.output_tokens, "must be >= 1")
        for name in ("prompt_tokens_range", "output_tokens_range"):
            lo, hi = getattr(self, name)
            require(1 <= lo <= hi, name, (lo, hi), "must satisfy 1 <= low <= high")
        for name in ("prompt_lognormal", "output_lognormal"):
            median, sigma = getattr(self, name)
            require(median >= 1 and math.isfinite(median) and 0 <= sigma <= 5, name,
                    (median, sigma), "must be (median >= 1 token, sigma in [0, 5])")
        if self.trace_qps is not None:
            require(self.trace_qps > 0, "trace_qps", self.trace_qps, "must be > 0 requests/s")
        if self.trace_start is not None:
            require(self.trace_start >= 0, "trace_start", self.trace_start, "must be >= 0")
        if self.trace_rows is not None:
            require(0 <= self.trace_rows[0] < self.trace_rows[1], "trace_rows", self.trace_rows,
                    "must satisfy 0 <= first < end")
            require(self.trace_start is None, "trace_rows", self.trace_rows,
                    "conflicts with trace_start (a fixed window)")
        if self.max_total_tokens is not None:
            require(self.max_total_tokens >= 2, "max_total_tokens", self.max_total_tokens,
                    "must be >= 2 tokens")
        require(self.trace_hash_block_tokens >= 1, "trace_hash_block_tokens",
                self.trace_hash_block_tokens, "must be >= 1 token")
        if self.prefix != "none":
            require(self.lengths != "trace", "prefix", self.prefix,
                    "synthetic prefixes draw their new tokens from lengths='fixed', 'uniform' "
                    "or 'empirical', not from a trace (a Mooncake trace has its own prefixes)")
        if self.prefix == "multiturn":
            require(self.arrival == "poisson", "arrival", self.arrival,
                    "prefix='multiturn' draws its own arrivals (Poisson sessions, turn gaps): "
                    "set arrival='poisson'")


@dataclass(frozen=True)
class SLOConfig:
    """Latency targets for SLO attainment (and the optional SLO reward term).

    Defaults are interactive-chat targets for a 7B model: the first token within half a second
    and 20 tokens/s afterwards (looser targets report ~100% attainment for every router here).
    They define SLO attainment, SLO goodput (``goodput_rps``, see
    :mod:`llm_cluster_env.sim.metrics`) and the reward's ``slo_violation_penalty`` and
    ``goodput_weight`` terms. A target <= 0 (or NaN) is refused.

    :param ttft_s: time-to-first-token target (seconds).
    :param tpot_s: time-per-output-token target (seconds per token after the first).
    """

    ttft_s: float = 0.5
    tpot_s: float = 0.05

    def __post_init__(self) -> None:
        require(self.ttft_s > 0, "ttft_s", self.ttft_s, "must be > 0 seconds")
        require(self.tpot_s > 0, "tpot_s", self.tpot_s, "must be > 0 seconds per token")


@dataclass(frozen=True)
class ObservationConfig:
    """What the router sees (see :mod:`llm_cluster_env.env.observation` for the feature table).

    :param history_window: number of recent routing decisions included as one-hot vectors.
    :param dispatch_share_window: number of recent dispatches over which each replica's
        dispatch share is measured (requests).
    :param arrival_rate_timescale_s: time constant of the exponentially decayed arrival-rate
        estimate (seconds).
    :param output_length_oracle: expose each request's true remaining output tokens. ``False``
        (deployable) estimates them from the workload's length distribution instead.
    :param engine_signals: add the per-replica engine-model estimates (seconds) of the pending
        request's wait, time to first token and added total time in system
        (:mod:`llm_cluster_env.routing.engine_model`).
    :param replica_slots: pad the per-replica block to this many replica slots (>= the
        cluster's replicas); the slots past the cluster's replicas are all zero and routers
        ignore them. ``None`` = exactly the cluster's replicas. This is how one policy trains on
        clusters of several sizes.
    :param prefix_features: add the per-replica prefix-cache features (``prefix_hit``,
        ``prefix_index_fill``, ``cache_usage``); ``None`` = when the replicas cache prefixes.
    :param prefix_oracle: ``prefix_hit`` is the true cached fraction of the pending prompt on
        each replica. ``False`` (deployable) estimates it from the router's own routing
        history, as SGLang's router does.
    :param prefix_index_blocks: capacity of the router-side prefix index per replica (KV
        blocks; least recently routed blocks are forgotten beyond it); ``None`` = the replica's
        KV capacity (plus its host tier), as llm-d's prefix scorer sizes it from the engines'
        reported block counts.
    """

    history_window: int = 0
    dispatch_share_window: int = 64
    arrival_rate_timescale_s: float = 10.0
    output_length_oracle: bool = False
    engine_signals: bool = True
    replica_slots: int | None = None
    prefix_features: bool | None = None
    prefix_oracle: bool = False
    prefix_index_blocks: int | None = None

    def __post_init__(self) -> None:
        require(0 <= self.history_window <= 64, "history_window", self.history_window,
                "must be in [0, 64] decisions")
        require(self.dispatch_share_window >= 1, "dispatch_share_window",
                self.dispatch_share_window, "must be >= 1 request")
        require(self.arrival_rate_timescale_s > 0, "arrival_rate_timescale_s",
                self.arrival_rate_timescale_s, "must be > 0 seconds")
        if self.replica_slots is not None:
            require(1 <= self.replica_slots <= 1024, "replica_slots", self.replica_slots,
                    "must be in [1, 1024] replicas")
        if self.prefix_index_blocks is not None:
            require(self.prefix_index_blocks >= 1, "prefix_index_blocks",
                    self.prefix_index_blocks, "must be >= 1 block")


@dataclass(frozen=True)
class RewardConfig:
    """Reward terms, summed each step (see :mod:`llm_cluster_env.env.reward`).

    :param latency_weight: weight of minus the time-integral of requests in the system over the
        step (request-seconds), so an episode's return is ``-latency_weight * sum(E2E latency)``.
    :param ttft_weight: weight of minus the summed time to first token (seconds) of the requests
        completed in the step, so an episode adds ``-ttft_weight * sum(TTFT)``.
    :param slo_violation_penalty: subtracted per request completed in the step that missed its
        TTFT or TPOT target.
    :param imbalance_penalty: weight of ``1 - balance`` of the recent dispatch shares.
    :param goodput_weight: added per request completed in the step that met both its TTFT and
        its TPOT target (``SLOConfig``), so an episode adds ``goodput_weight * (requests that
        met the SLO)``: the SLO goodput times the episode's span.
    :param scale: every term is multiplied by this (keeps returns in a range PPO likes).
    """

    latency_weight: float = 1.0
    ttft_weight: float = 0.0
    slo_violation_penalty: float = 0.0
    imbalance_penalty: float = 0.0
    goodput_weight: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("latency_weight", "ttft_weight", "slo_violation_penalty", "imbalance_penalty",
                     "goodput_weight"):
            value = getattr(self, name)
            require(value >= 0 and math.isfinite(value), name, value, "must be a finite number >= 0")
        require(self.scale > 0, "scale", self.scale, "must be > 0")


@dataclass(frozen=True)
class EnvConfig:
    """Everything ``LLMCluster-v0`` needs.

    :param name: scenario name, reported in episode metrics.
    :param num_replicas: number of identical replicas built from ``replica``.
    :param replica: template for identical replicas.
    :param replicas: explicit per-replica configs (heterogeneous cluster); overrides
        ``num_replicas`` and ``replica`` when non-empty.
    :param workload: arrivals and lengths.
    :param observation: observation features.
    :param reward: reward terms.
    :param slo: latency targets.
    :param episode_requests: requests per episode; after the last one the cluster drains.
    :param step_limit: end an episode after this many steps (routed requests) with
        ``truncated=True``, without draining, if its ``episode_requests`` are not all routed by
        then; the requests still in the cluster stay unfinished. ``None``: no limit (episodes
        end only by termination). ``env.spec.max_episode_steps`` reports it.
    :param simulation_mode: ``"jump"`` advances pure-decode stretches in closed form;
        ``"iteration"`` simulates every iteration. Both give the same timestamps (to 1e-9 s).
    :param check_invariants: verify KV-block and clock invariants after every event (slower).
    """

    name: str = "custom"
    num_replicas: int = 4
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    replicas: tuple[ReplicaConfig, ...] = ()
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    observation: ObservationConfig = field(default_factory=ObservationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    slo: SLOConfig = field(default_factory=SLOConfig)
    episode_requests: int = 2000
    step_limit: int | None = None
    simulation_mode: Literal["jump", "iteration"] = "jump"
    check_invariants: bool = False

    def __post_init__(self) -> None:
        require(1 <= self.num_replicas <= 1024, "num_replicas", self.num_replicas,
                "must be in [1, 1024]")
        require(self.episode_requests >= 1, "episode_requests", self.episode_requests,
                "must be >= 1 request")
        if self.step_limit is not None:
            require(self.step_limit >= 1, "step_limit", self.step_limit, "must be >= 1 step")
        if self.replicas:  # keep num_replicas truthful for heterogeneous clusters
            object.__setattr__(self, "num_replicas", len(self.replicas))
        slots = self.observation.replica_slots
        if slots is not None:
            require(slots >= self.num_replicas, "observation.replica_slots", slots,
                    f"fewer slots than the cluster's {self.num_replicas} replicas")

    @property
    def replica_configs(self) -> tuple[ReplicaConfig, ...]:
        """The per-replica configs: ``replicas`` if given, else ``num_replicas`` copies."""
        return self.replicas if self.replicas else (self.replica,) * self.num_replicas

    @classmethod
    def from_kwargs(cls, scenario: str | None = None, **kwargs: Any) -> EnvConfig:
        """Build a config from keyword arguments, layered over a named scenario if given.

        :param scenario: a packaged scenario name or a path to a scenario YAML file.
        :param kwargs: fields of :class:`EnvConfig`; nested configs as dicts (merged key by
            key into the scenario's).
        """
        base: Mapping[str, Any] = {}
        if scenario is not None:
            from llm_cluster_env.scenarios import load_scenario_dict

            base = load_scenario_dict(scenario)
        merged = deep_merge(base, kwargs)
        explicit = merged.get("replicas") or ()
        if explicit and "num_replicas" in merged and merged["num_replicas"] != len(explicit):
            raise ConfigError(
                f"num_replicas={merged['num_replicas']!r}: conflicts with the {len(explicit)} "
                "entries of 'replicas' (pass replicas=[] to build identical replicas instead)"
            )
        return from_dict(cls, merged)


__all__ = [
    "ConfigError",
    "EnvConfig",
    "MultiTurnConfig",
    "ObservationConfig",
    "PhaseConfig",
    "ReplicaConfig",
    "RewardConfig",
    "SLOConfig",
    "SystemPromptConfig",
    "WorkloadConfig",
]
