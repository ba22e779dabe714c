"""Model shapes and GPU specifications, and the KV-cache capacity they imply.

Model shapes are the public Hugging Face configs (they match the shape columns of Vidur's
profiling CSVs). GPU figures are the vendors' published datasheet numbers for the SXM parts:

=======  ==============  ============================  ===================
GPU      memory (GiB)    dense BF16 peak (TFLOP/s)     HBM bandwidth (TB/s)
=======  ==============  ============================  ===================
a100     80              312                           2.039
h100     80              989                           3.35
a40      48              149.7                         0.696
=======  ==============  ============================  ===================

The peak rates are used only to scale attention-kernel timings measured on one GPU to another
(see :mod:`llm_cluster_env.sim.latency`); capacity uses memory alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

GIB = 1 << 30


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer.

    :param name: registry key.
    :param num_layers: transformer blocks.
    :param hidden_size: embedding width.
    :param num_q_heads: attention query heads.
    :param num_kv_heads: key/value heads (grouped-query attention when fewer than query heads).
    :param head_dim: width of one head.
    :param intermediate_size: MLP width.
    :param vocab_size: vocabulary size.
    :param num_params: parameter count (for weight memory).
    :param max_model_len: context length (tokens).
    :param dtype_bytes: bytes per weight and per cached K/V element (2 for fp16/bf16).
    """

    name: str
    num_layers: int
    hidden_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_params: float
    max_model_len: int
    dtype_bytes: int = 2

    def kv_bytes_per_token(self, tensor_parallel: int) -> int:
        """Bytes of K and V cached per token on each GPU of a ``tensor_parallel`` replica."""
        kv_heads_per_gpu = max(1, self.num_kv_heads // tensor_parallel)
        return 2 * self.num_layers * kv_heads_per_gpu * self.head_dim * self.dtype_bytes

    def weight_bytes_per_gpu(self, tensor_parallel: int) -> float:
        """Bytes of weights held by each GPU (weights split evenly across the TP group)."""
        return self.num_params * self.dtype_bytes / tensor_parallel


@dataclass(frozen=True)
class GPUSpec:
    """Published figures of one accelerator.

    :param name: registry key.
    :param memory_bytes: device memory (bytes).
    :param peak_flops: dense BF16 tensor-core peak (FLOP/s).
    :param memory_bandwidth: HBM/GDDR bandwidth (bytes/s).
    """

    name: str
    memory_bytes: int
    peak_flops: float
    memory_bandwidth: float


MODELS: MappingProxyType[str, ModelSpec] = MappingProxyType({
    "llama-2-7b": ModelSpec("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, 6.738e9, 4096),
    "llama-3-8b": ModelSpec("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8.030e9, 8192),
    # Llama-3-8B's shapes with a 128k window (RoPE scaling changes no kernel time)
    "llama-3.1-8b": ModelSpec("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, 8.030e9, 131072),
    "llama-2-70b": ModelSpec("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000, 68.98e9, 4096),
})

GPUS: MappingProxyType[str, GPUSpec] = MappingProxyType({
    "a100": GPUSpec("a100", 80 * GIB, 312e12, 2.039e12),
    "h100": GPUSpec("h100", 80 * GIB, 989e12, 3.35e12),
    "a40": GPUSpec("a40", 48 * GIB, 149.7e12, 0.696e12),
})

#: Memory held back for activations and the CUDA context (bytes per GPU). vLLM measures this
#: with a profiling forward pass; ~2 GiB is what it reports for 7B-8B models at 4k tokens.
ACTIVATION_RESERVE_BYTES = 2 * GIB


def kv_cache_blocks(
    model: ModelSpec,
    gpu: GPUSpec,
    tensor_parallel: int,
    block_size: int,
    gpu_memory_utilization: float,
) -> int:
    """Number of KV-cache blocks a replica can hold.

    ``(memory * utilization - weights - activation reserve) / bytes per cached token``, per
    GPU, rounded down to whole blocks of ``block_size`` tokens. Raises ``ValueError`` when the
    weights do not fit at all.
    """
    free = gpu.memory_bytes * gpu_memory_utilization
    free -= model.weight_bytes_per_gpu(tensor_parallel) + ACTIVATION_RESERVE_BYTES
    if free <= 0:
        raise ValueError(
            f"model {model.name!r} does not fit on {tensor_parallel}x {gpu.name}: "
            f"{model.weight_bytes_per_gpu(tensor_parallel) / GIB:.1f} GiB of weights per GPU"
        )
    tokens = free / model.kv_bytes_per_token(tensor_parallel)
    return int(math.floor(tokens / block_size))


def vidur_kv_cache_blocks(
    model: ModelSpec,
    gpu: GPUSpec,
    tensor_parallel: int,
    block_size: int,
    gpu_memory_utilization: float,
) -> int:
    """KV-cache blocks under Vidur's memory planner (the ``vllm_v0`` batching policy).

    Per GPU, ``memory * utilization - weights`` (no activation reserve) is divided into whole
    requests at the model's full context length (``kv_bytes_per_token * max_model_len``
    each), and the capacity is that many requests times ``max_model_len / block_size`` blocks.
    Llama-2-7B on one 80 GiB A100 at utilisation 0.9 (Vidur's 10 % margin): 29 requests of
    4,096 tokens = 7,424 blocks of 16 tokens. Raises ``ValueError`` when not even one
    full-length request fits.
    """
    free = gpu.memory_bytes * gpu_memory_utilization - model.weight_bytes_per_gpu(tensor_parallel)
    per_request = model.kv_bytes_per_token(tensor_parallel) * model.max_model_len
    requests = int(math.floor(free / per_request)) if free > 0 else 0
    if requests < 1:
        raise ValueError(
            f"model {model.name!r} on {tensor_parallel}x {gpu.name}: not one request of "
            f"{model.max_model_len} tokens fits beside the weights (Vidur's memory rule)"
        )
    return requests * model.max_model_len // block_size


def servable_request_tokens(num_blocks: int, block_size: int, watermark: float,
                            one_free_block: bool = False) -> int:
    """Largest prompt + output (tokens) a replica with ``num_blocks`` KV blocks can always finish.

    Admission needs the prompt's blocks above the watermark ``int(watermark * num_blocks)``
    blocks and the last decode step needs ``prompt + output - 1`` slots, so
    ``(num_blocks - watermark blocks) * block_size`` tokens fit. With ``one_free_block`` (vLLM
    v0 and Vidur: every decoding request needs one free block before its turn) a lone request
    must never hold every block before a decode step: ``prompt + output - 2`` tokens in
    ``num_blocks - 1`` blocks.
    """
    limit = (num_blocks - int(watermark * num_blocks)) * block_size
    if one_free_block:
        limit = min(limit, (num_blocks - 1) * block_size + 2)
    return limit
