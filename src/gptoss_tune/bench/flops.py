"""The FLOP model behind the MFU column.

LoRA training of a frozen base does not cost the usual 6N FLOPs per token: the frozen weights need
no weight gradient, only the input gradient. Per real token:

- base matmuls: 4 N (forward 2 N, input gradient 2 N), N = the active matmul weights a token passes
  through: q/k/v/o, the router, the top-k experts' gate_up and down, and lm_head (embeddings are a
  lookup, not a matmul). For gpt-oss-20b N = 3.61 B.
- LoRA: 6 per adapter weight a token passes through (forward, input gradient, weight gradient);
  an expert adapter counts k times (its token's k experts).
- attention: 4 * heads * head_dim per visible (query, key) pair forward (QK^T and PV), times 3 for
  forward + backward (dQ, dK, dV and dP are four matmuls of the same size). Visible pairs are
  counted per document, causal, inside the window on sliding layers.

Recomputation (activation checkpointing, the loss chunks) is work the hardware does but the model
does not need; it is not counted. Padding is not counted either: every recipe is credited only
for its real tokens, so MFU compares useful work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from transformers import GptOssConfig

# Dense bf16 peak of the GPUs we expect, from the vendors' datasheets (TFLOP/s, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
}


def peak_tflops_for(device_name: str) -> float | None:
    """The datasheet bf16 peak for a CUDA device name, or None when unknown (pass --peak-tflops)."""
    for model, peak in PEAK_BF16_TFLOPS.items():
        if model.lower() in device_name.lower():
            return peak
    return None


def attention_parameters(config: GptOssConfig) -> int:
    hidden, head_dim = config.hidden_size, config.head_dim
    query_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    return hidden * query_out + 2 * hidden * kv_out + query_out * hidden


def expert_parameters(config: GptOssConfig) -> int:
    """One expert's gate_up and down weights."""
    return 3 * config.hidden_size * config.intermediate_size


def active_matmul_parameters(config: GptOssConfig) -> int:
    """N: the matmul weights one token passes through (all layers and lm_head)."""
    router = config.hidden_size * config.num_local_experts
    experts = config.num_experts_per_tok * expert_parameters(config)
    per_layer = attention_parameters(config) + router + experts
    return config.num_hidden_layers * per_layer + config.hidden_size * config.vocab_size


def lora_parameters_per_token(config: GptOssConfig, rank: int, targets: Iterable[str]) -> int:
    """Adapter weights a token passes through (expert adapters counted for each of its k experts)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    query_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    inner = config.intermediate_size
    sizes = {
        "q_proj": hidden + query_out,
        "k_proj": hidden + kv_out,
        "v_proj": hidden + kv_out,
        "o_proj": query_out + hidden,
        "gate_up_proj": config.num_experts_per_tok * (hidden + 2 * inner),
        "down_proj": config.num_experts_per_tok * (inner + hidden),
    }
    per_layer = sum(rank * sizes[name] for name in targets)
    return config.num_hidden_layers * per_layer


def visible_pairs(document_length: int, window: int | None) -> int:
    """(query, key) pairs a causal document of this length attends to, inside the window if any."""
    n = document_length
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def attention_flops(config: GptOssConfig, document_lengths: Iterable[int]) -> int:
    """Forward + backward attention FLOPs of all layers for these documents."""
    lengths = list(document_lengths)
    per_pair = 4 * config.num_attention_heads * config.head_dim
    pairs = 0
    for layer_type in config.layer_types[: config.num_hidden_layers]:
        window = config.sliding_window if layer_type == "sliding_attention" else None
        pairs += sum(visible_pairs(n, window) for n in lengths)
    return 3 * per_pair * pairs


@dataclass(frozen=True)
class FlopModel:
    config: GptOssConfig
    lora_rank: int
    lora_targets: tuple[str, ...]

    @property
    def matmul_parameters(self) -> int:
        return active_matmul_parameters(self.config)

    def training_flops(self, document_lengths: Iterable[int]) -> int:
        """Model FLOPs of one forward + backward over these (real) documents."""
        lengths = list(document_lengths)
        tokens = sum(lengths)
        lora = lora_parameters_per_token(self.config, self.lora_rank, self.lora_targets)
        return 4 * self.matmul_parameters * tokens + 6 * lora * tokens + attention_flops(self.config, lengths)


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    if peak_tflops is None or seconds <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
