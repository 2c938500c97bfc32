"""The gpt-oss model we train: one file, transformers' parameter names and shapes.

`GptOss(config).state_dict()` has exactly the keys and shapes of transformers'
`GptOssForCausalLM`, so checkpoints move between the two without renaming. What differs:

- Packed batches. `position_ids` restart at every document start; a token attends only to earlier
  tokens of its own document (and, on sliding layers, only to the last `sliding_window` of them).
- Attention, the expert computation and the loss are plain functions that can be swapped for GPU
  kernels (`GptOss.set_kernels`, see `gptoss_tune.kernels`); the eager ones here are the reference.
  Fused kernels read the expert weights through `Experts.gate_up_weight()` / `down_weight()`.
- Expert LoRA is computed on the routed tokens (x A_e B_e), never by materializing W + BA; the
  adapters are attached by `gptoss_tune.model.lora`.
- The loss returns a sum and a count, so a trainer can normalize over a whole optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GptOssConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from gptoss_tune.model.mxfp4 import DequantizeFn, Mxfp4Weight, dequantize_experts, frozen_weight_op

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------
# Packing: documents, masks, positions
# ---------------------------------------------------------------------------------------------------


def default_position_ids(input_ids: Tensor) -> Tensor:
    """One document per row: positions 0..T-1."""
    batch, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).expand(batch, length)


def document_ids(position_ids: Tensor) -> Tensor:
    """[B, T] index of the document of each token within its row.

    A document starts wherever the position does not continue the previous one (normally a reset
    to 0), so packed rows need no extra metadata.
    """
    continues = position_ids[:, 1:] == position_ids[:, :-1] + 1
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = ~continues
    return starts.cumsum(dim=1) - 1


def attention_mask(documents: Tensor, sliding_window: int | None) -> Tensor:
    """[B, T, T] boolean: query q may attend key k (causal, same document, inside the window).

    The window includes the token itself: k is visible when q - window < k <= q.
    """
    length = documents.shape[1]
    index = torch.arange(length, device=documents.device)
    query, key = index[:, None], index[None, :]
    allowed = (key <= query) & (documents[:, :, None] == documents[:, None, :])
    if sliding_window is not None:
        allowed &= query - key < sliding_window
    return allowed


# ---------------------------------------------------------------------------------------------------
# Swappable compute: attention, experts, norms, rotary embedding
# ---------------------------------------------------------------------------------------------------


class NormFn(Protocol):
    def __call__(self, hidden: Tensor, weight: Tensor, eps: float) -> Tensor:
        """RMSNorm of hidden [..., H] with weight [H]."""
        ...


class RotaryFn(Protocol):
    def __call__(self, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """query [B, T, Hq, D], key [B, T, Hkv, D], cos / sin [B, T, D / 2] -> rotated (query, key).
        Token-major, as the projections produce them: rotating before the heads are transposed
        keeps the rotation a same-layout elementwise pass (a transposing one runs ~10x slower)."""
        ...


class AttentionFn(Protocol):
    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        sinks: Tensor,
        *,
        scaling: float,
        sliding_window: int | None,
        documents: Tensor,
    ) -> Tensor:
        """query [B, Hq, T, D], key/value [B, Hkv, T, D], sinks [Hq] -> [B, Hq, T, D]."""
        ...


def eager_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    sinks: Tensor,
    *,
    scaling: float,
    sliding_window: int | None,
    documents: Tensor,
) -> Tensor:
    """Softmax attention where each head also has a learned "sink" logit that takes probability
    mass but contributes no value. Grouped-query: q head h reads kv head h // (Hq / Hkv)."""
    batch, num_heads, length, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    query = query.reshape(batch, num_kv_heads, group, length, head_dim)
    scores = torch.matmul(query, key.unsqueeze(2).transpose(-1, -2)) * scaling  # [B, Hkv, G, T, T]
    allowed = attention_mask(documents, sliding_window)[:, None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink_logits = sinks.to(scores.dtype).view(1, num_kv_heads, group, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink_logits], dim=-1), dim=-1, dtype=torch.float32)
    probs = probs[..., :-1].to(value.dtype)
    return torch.matmul(probs, value.unsqueeze(2)).view(batch, num_heads, length, head_dim)


class ProjectionsFn(Protocol):
    def __call__(
        self, projections: Sequence[nn.Linear], hidden: Tensor, norm_source: NormSource | None = None
    ) -> list[Tensor]:
        """Each of `projections` (nn.Linear or LoRA-wrapped ones: the query, key and value
        projections together, or the output projection alone) applied to hidden [B, T, in] ->
        [[B, T, out_i]]. `norm_source`: what `hidden` was normalized from, if it was (see
        `NormSource`)."""
        ...


def separate_projections(
    projections: Sequence[nn.Linear], hidden: Tensor, norm_source: NormSource | None = None
) -> list[Tensor]:
    return [projection(hidden) for projection in projections]


class LossFn(Protocol):
    def __call__(
        self, hidden: Tensor, lm_head_weight: Tensor, labels: Tensor, position_ids: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Final hidden states [B, T, H] -> (sum of next-token losses in fp32, number of targets)."""
        ...


class ExpertsFn(Protocol):
    def __call__(
        self,
        experts: Experts,
        hidden: Tensor,
        expert_indices: Tensor,
        expert_weights: Tensor,
        norm_source: NormSource | None = None,
    ) -> Tensor:
        """hidden [N, H], expert_indices / expert_weights [N, k] -> [N, H]. `norm_source`: what
        `hidden` was normalized from, if it was (see `NormSource`)."""
        ...


def group_by_expert(expert_indices: Tensor, num_experts: int) -> tuple[Tensor, Tensor, list[int]]:
    """Sort the N*k (token, expert) assignments by expert.

    Returns the assignment order (indices into the flattened [N*k] routing tensors), the token of
    each sorted assignment, and how many assignments each expert received.
    """
    flat = expert_indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = order // expert_indices.shape[1]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, tokens, counts


def clamped_swiglu(gate_up: Tensor, alpha: float, limit: float) -> Tensor:
    """gpt-oss's activation on interleaved [gate, up] columns (gate = [..., ::2], up = [..., 1::2]):
    (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=l)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def eager_experts(
    experts: Experts,
    hidden: Tensor,
    expert_indices: Tensor,
    expert_weights: Tensor,
    norm_source: NormSource | None = None,
) -> Tensor:
    """Loop over the experts that received tokens; each runs only on its own tokens. Autograd keeps
    what it keeps (`norm_source` is not used)."""
    order, tokens, counts = group_by_expert(expert_indices, experts.num_experts)
    weights = expert_weights.reshape(-1)[order]
    # Once per layer forward (MXFP4 storage dequantizes here); each expert reads its slice.
    gate_up_weight, down_weight = experts.gate_up_weight(), experts.down_weight()
    output = torch.zeros_like(hidden)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        token_index = tokens[start : start + count]
        routed = hidden.index_select(0, token_index)
        activated = experts.activation(experts.gate_up(routed, expert, gate_up_weight))
        expert_out = experts.down(activated, expert, down_weight)
        expert_out = expert_out * weights[start : start + count, None]
        output.index_add_(0, token_index, expert_out.to(hidden.dtype))
        start += count
    return output


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------


def rms_norm(hidden: Tensor, weight: Tensor, eps: float) -> Tensor:
    """gpt-oss's RMSNorm: normalized and scaled in fp32, returned in the input's dtype."""
    normed = hidden.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed).to(hidden.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.norm_fn: NormFn = rms_norm

    def forward(self, hidden: Tensor) -> Tensor:
        return self.norm_fn(hidden, self.weight, self.eps)


@dataclass(frozen=True, eq=False)  # eq would compare the tensors elementwise
class NormSource:
    """What a normalized hidden state was computed from: `norm(hidden)`.

    The norm keeps `hidden` for its backward anyway (the compiled norm of the fast paths keeps
    exactly it; the eager one an fp32 copy). A fast path that would keep the normalized tensor for
    its own backward (the q/k/v projections, the experts) can keep `hidden` instead and normalize it
    again in backward: each layer then keeps two [N, H] tensors fewer, for two more memory-bound
    norm passes (well under 1% of a layer's time)."""

    hidden: Tensor
    norm: RMSNorm

    def kept_by_the_norm(self) -> bool:
        """Whether the norm's backward runs, so that the norm keeps `hidden` anyway (not for the
        first layer's input: the embedding is frozen, so its norm keeps nothing)."""
        norm_trains = any(param.requires_grad for param in self.norm.parameters())
        return torch.is_grad_enabled() and (self.hidden.requires_grad or norm_trains)

    @staticmethod
    def keep(rows: Tensor, norm_source: NormSource | None) -> tuple[Tensor, RMSNorm | None]:
        """What a fast path that reads `rows` (the norm's output, as [N, H] rows) in backward keeps
        for it: the norm's input and the norm, or the rows themselves without a source. Only the
        tensor goes to `save_for_backward` (a tensor on ctx would escape checkpointing's hooks)."""
        return (norm_source.hidden, norm_source.norm) if norm_source is not None else (rows, None)

    @staticmethod
    def rows_again(kept: Tensor | None, norm: RMSNorm | None, dtype: torch.dtype) -> Tensor | None:
        """The rows `keep` kept for: `norm(kept)` again, without autograd, as [N, H] rows in `dtype`
        (the same function on the same values gives the same result); `kept` itself without a norm."""
        if norm is None:
            return kept
        with torch.no_grad():
            normed = norm(kept)
        return normed.reshape(-1, normed.shape[-1]).to(dtype)


def rope_settings(config: GptOssConfig) -> dict:
    """transformers 5's `rope_parameters`, or 4.x's `rope_scaling` + `rope_theta`."""
    if parameters := getattr(config, "rope_parameters", None):
        return parameters
    return {**(config.rope_scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta}


def rope_parameters(config: GptOssConfig) -> tuple[Tensor, float]:
    """(inv_freq [head_dim / 2] in fp32 on the CPU, attention scaling), as transformers computes them."""
    settings = rope_settings(config)
    rope_type = settings.get("rope_type", "default")
    # Explicitly on the CPU, also when the model is being built under `torch.device("meta")`.
    with torch.device("cpu"):
        if rope_type == "default":
            theta, dim = settings["rope_theta"], config.head_dim
            return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


class RotaryEmbedding:
    """cos / sin tables for position ids (YaRN for gpt-oss).

    Not an nn.Module on purpose: inv_freq is neither a parameter nor a buffer, so `model.to(bf16)`,
    meta-device construction and state dicts leave it alone; it stays fp32 and moves to the device
    of the positions on first use.
    """

    def __init__(self, config: GptOssConfig) -> None:
        self.inv_freq, self.attention_scaling = rope_parameters(config)

    def __call__(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        angles = position_ids[..., None].float() * self.inv_freq  # [B, T, D / 2]
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, D]; cos / sin [B, T, D / 2]. Rotates the two halves of the head dimension."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def rotate_query_key(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)


class Attention(nn.Module):
    def __init__(self, config: GptOssConfig, layer_index: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        is_sliding = config.layer_types[layer_index] == "sliding_attention"
        self.sliding_window: int | None = config.sliding_window if is_sliding else None
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.sinks = nn.Parameter(torch.zeros(self.num_heads))
        self.attention_fn: AttentionFn = eager_attention
        self.rotary_fn: RotaryFn = rotate_query_key
        self.projections_fn: ProjectionsFn = separate_projections

    def _heads(self, projected: Tensor) -> Tensor:
        """[B, T, H * D] -> [B, T, H, D] (a view)."""
        batch, length, _ = projected.shape
        return projected.view(batch, length, -1, self.head_dim)

    def forward(
        self,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        documents: Tensor,
        norm_source: NormSource | None = None,
    ) -> Tensor:
        batch, length, _ = hidden.shape
        query, key, value = (
            self._heads(projected)
            for projected in self.projections_fn((self.q_proj, self.k_proj, self.v_proj), hidden, norm_source)
        )
        query, key = self.rotary_fn(query, key, cos, sin)
        # [B, H, T, D] views of the token-major tensors: the attention functions take any strides
        attended = self.attention_fn(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.sinks,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            documents=documents,
        )
        (out,) = self.projections_fn((self.o_proj,), attended.transpose(1, 2).reshape(batch, length, -1))
        return out


class Router(nn.Module):
    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.weight = nn.Parameter(torch.zeros(config.num_local_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_local_experts))

    def forward(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """hidden [N, H] -> (expert indices [N, k], weights [N, k]): softmax over the top-k logits."""
        logits = F.linear(hidden, self.weight, self.bias)
        top_logits, indices = torch.topk(logits, self.top_k, dim=-1)
        return indices, torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(hidden.dtype)


class Experts(nn.Module):
    """Stacked expert weights in transformers' layout ([E, in, out]).

    gate_up_proj interleaves gate and up columns (gate = [..., ::2], up = [..., 1::2]).
    `gate_up_lora` / `down_lora` are optional low-rank adapters (see `gptoss_tune.model.lora`):
    modules called as adapter(x, expert) that return the low-rank update of that projection.

    Storage, per projection: a dense parameter `gate_up_proj` / `down_proj`, or MXFP4 (`store_mxfp4`):
    uint8 buffers `gate_up_proj_blocks` / `_scales` in the checkpoint layout, which are also the
    state-dict keys of MXFP4 checkpoints. Compute reads weights only through `gate_up_weight()` /
    `down_weight()` (dense, in the biases' dtype) and keeps no reference to them for backward
    (`gptoss_tune.model.mxfp4.frozen_weight_op`), so dequantized weights live for one layer only.

    `recompute_gate_up` asks an `ExpertsFn` to keep no gate_up output for backward and to compute it
    again there (a cheaper memory saving than checkpointing the whole layer; see
    `gptoss_tune.kernels.memory`). The grouped-GEMM experts honour it; the eager loop keeps what
    autograd keeps.
    """

    PROJECTIONS = ("gate_up_proj", "down_proj")

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        experts, hidden, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts = experts
        # Older transformers configs have no swiglu_alpha; 1.702 is the constant of the published models.
        self.alpha = getattr(config, "swiglu_alpha", 1.702)
        self.limit = config.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.zeros(experts, hidden, 2 * inner))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(experts, 2 * inner))
        self.down_proj = nn.Parameter(torch.zeros(experts, inner, hidden))
        self.down_proj_bias = nn.Parameter(torch.zeros(experts, hidden))
        self.gate_up_lora: nn.Module | None = None
        self.down_lora: nn.Module | None = None
        self.shapes = {"gate_up_proj": (experts, hidden, 2 * inner), "down_proj": (experts, inner, hidden)}
        self.dequantize_fn: DequantizeFn = dequantize_experts
        self.recompute_gate_up = False

    # --- storage ------------------------------------------------------------------------------------

    def is_mxfp4(self, name: str) -> bool:
        """Whether projection `name` (gate_up_proj or down_proj) is stored as MXFP4."""
        return f"{name}_blocks" in self._buffers

    def weight_shape(self, name: str) -> torch.Size:
        """The dense [E, in, out] shape of projection `name`, whatever its storage."""
        return torch.Size(self.shapes[name])

    def store_mxfp4(self, name: str, weight: Mxfp4Weight) -> None:
        """Keep projection `name` as MXFP4 buffers (frozen; the dense parameter is dropped)."""
        if weight.shape != self.weight_shape(name):
            raise ValueError(
                f"MXFP4 {name} dequantizes to {tuple(weight.shape)}, expected {tuple(self.weight_shape(name))}"
            )
        self._parameters.pop(name, None)
        self.register_buffer(f"{name}_blocks", weight.blocks)
        self.register_buffer(f"{name}_scales", weight.scales)

    def store_dense(self, name: str, weight: Tensor) -> None:
        """Keep projection `name` as a frozen dense parameter [E, in, out] (e.g. `dense(name)` of an
        MXFP4-stored projection), dropping MXFP4 buffers."""
        if weight.shape != self.weight_shape(name):
            raise ValueError(f"{name} is {tuple(weight.shape)}, expected {tuple(self.weight_shape(name))}")
        self._buffers.pop(f"{name}_blocks", None)
        self._buffers.pop(f"{name}_scales", None)
        self.register_parameter(name, nn.Parameter(weight, requires_grad=False))

    def dense(self, name: str, experts: slice | None = None) -> Tensor:
        """Dense weight of projection `name` [E, in, out] (or of the `experts` slice) in the
        compute dtype: the parameter itself, or a fresh dequantization of the MXFP4 buffers."""
        if not self.is_mxfp4(name):
            weight = getattr(self, name)
            return weight if experts is None else weight[experts]
        blocks, scales = self._buffers[f"{name}_blocks"], self._buffers[f"{name}_scales"]
        if experts is not None:
            blocks, scales = blocks[experts], scales[experts]
        return self.dequantize_fn(blocks, scales, getattr(self, f"{name}_bias").dtype)

    def expert_weight(self, name: str, expert: int) -> Tensor:
        """One expert's dense weight [in, out]; what backward rebuilds instead of saving it."""
        return self.dense(name, slice(expert, expert + 1))[0]

    def gate_up_weight(self) -> Tensor:
        """The dense gate_up weight [E, H, 2I] that every compute path reads (storage may differ)."""
        return self.dense("gate_up_proj")

    def down_weight(self) -> Tensor:
        """The dense down weight [E, I, H] that every compute path reads (storage may differ)."""
        return self.dense("down_proj")

    # --- compute ------------------------------------------------------------------------------------

    def _project(self, name: str, routed: Tensor, expert: int, weight: Tensor) -> Tensor:
        rebuild = partial(self.expert_weight, name, expert)
        return frozen_weight_op(torch.matmul, routed, weight[expert], rebuild)

    def gate_up(self, routed: Tensor, expert: int, weight: Tensor) -> Tensor:
        """routed [n, H] -> [n, 2I] for one expert; `weight` is `gate_up_weight()`, fetched once per layer."""
        out = self._project("gate_up_proj", routed, expert, weight) + self.gate_up_proj_bias[expert]
        if self.gate_up_lora is not None:
            out = out + self.gate_up_lora(routed, expert)
        return out

    def activation(self, gate_up: Tensor) -> Tensor:
        return clamped_swiglu(gate_up, self.alpha, self.limit)

    def down(self, activated: Tensor, expert: int, weight: Tensor) -> Tensor:
        """activated [n, I] -> [n, H] for one expert; `weight` is `down_weight()`, fetched once per layer."""
        out = self._project("down_proj", activated, expert, weight) + self.down_proj_bias[expert]
        if self.down_lora is not None:
            out = out + self.down_lora(activated, expert)
        return out


class MoE(nn.Module):
    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.router = Router(config)
        self.experts = Experts(config)
        self.experts_fn: ExpertsFn = eager_experts

    def forward(self, hidden: Tensor, norm_source: NormSource | None = None) -> Tensor:
        batch, length, size = hidden.shape
        flat = hidden.reshape(-1, size)
        expert_indices, expert_weights = self.router(flat)
        out = self.experts_fn(self.experts, flat, expert_indices, expert_weights, norm_source=norm_source)
        return out.view(batch, length, size)


class DecoderLayer(nn.Module):
    def __init__(self, config: GptOssConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config)
        self.recompute_norms = True  # offer the norms' inputs to the fast paths (see `NormSource`)

    def forward(self, hidden: Tensor, cos: Tensor, sin: Tensor, documents: Tensor) -> Tensor:
        attention_norm, mlp_norm = self.input_layernorm, self.post_attention_layernorm
        hidden = hidden + self.self_attn(
            attention_norm(hidden), cos, sin, documents, self._norm_source(hidden, attention_norm)
        )
        return hidden + self.mlp(mlp_norm(hidden), self._norm_source(hidden, mlp_norm))

    def _norm_source(self, hidden: Tensor, norm: RMSNorm) -> NormSource | None:
        """Offered only where keeping `hidden` costs nothing: the norm keeps it anyway."""
        source = NormSource(hidden, norm)
        return source if self.recompute_norms and source.kept_by_the_norm() else None


class GptOssDecoder(nn.Module):
    """Embeddings, decoder layers and final norm (transformers' `GptOssModel`, at `model.`)."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.checkpointed_layers: frozenset[int] = frozenset()  # recomputed in backward

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        hidden = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, hidden.dtype)
        documents = document_ids(position_ids)
        for index, layer in enumerate(self.layers):
            if index in self.checkpointed_layers and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, cos, sin, documents, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, documents)
        return self.norm(hidden)


class GptOss(nn.Module):
    """gpt-oss causal LM. Keys and shapes of `state_dict()` equal transformers' `GptOssForCausalLM`."""

    def __init__(self, config: GptOssConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GptOssDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.loss_fn: LossFn = chunked_causal_lm_loss

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Final-normed hidden states [B, T, H]; position_ids restart at 0 at each packed document."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        return self.model(input_ids, position_ids)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Logits [B, T, V]. For training prefer `hidden_states` + `chunked_causal_lm_loss`."""
        return self.lm_head(self.hidden_states(input_ids, position_ids))

    def loss(
        self, input_ids: Tensor, labels: Tensor, position_ids: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(sum of token losses, number of trained tokens); labels are aligned with input_ids."""
        hidden = self.hidden_states(input_ids, position_ids)
        return self.loss_fn(hidden, self.lm_head.weight, labels, position_ids)

    def set_gradient_checkpointing(
        self,
        enabled: bool | Iterable[int] = True,
        recompute_gate_up: Iterable[int] = (),
        recompute_norms: bool = True,
    ) -> None:
        """Recompute layer activations in backward: True for every layer, False for none, or the
        indices of the layers to recompute (selective checkpointing). `recompute_gate_up`: other
        layers whose experts recompute only their gate_up projection (`Experts.recompute_gate_up`).
        `recompute_norms`: the fast paths keep the norms' inputs instead of their outputs and
        normalize again in backward (`NormSource`; two memory-bound passes per layer)."""
        every_layer = range(len(self.model.layers))
        layers = enabled if not isinstance(enabled, bool) else every_layer if enabled else ()
        checkpointed = frozenset(int(index) for index in layers)
        gate_up = frozenset(int(index) for index in recompute_gate_up)
        if checkpointed & gate_up:
            raise ValueError(
                f"layers {sorted(checkpointed & gate_up)} are both checkpointed and set to recompute "
                "their experts' gate_up: a checkpointed layer recomputes everything already"
            )
        self.model.checkpointed_layers = checkpointed
        for index, layer in enumerate(self.model.layers):
            layer.mlp.experts.recompute_gate_up = index in gate_up
            layer.recompute_norms = recompute_norms

    @property
    def norms_recomputed(self) -> bool:
        """Whether the layers normalize again in backward: they offer their norms' inputs, and their
        projections or experts take them (the fast paths do, `takes_norm_source`; the eager references
        keep what autograd keeps)."""
        kernels = [
            fn for layer in self.model.layers for fn in (layer.self_attn.projections_fn, layer.mlp.experts_fn)
        ]
        offered = all(layer.recompute_norms for layer in self.model.layers)
        return offered and any(getattr(fn, "takes_norm_source", False) for fn in kernels)

    @property
    def gate_up_recomputed_layers(self) -> frozenset[int]:
        """The layers whose experts recompute their gate_up projection in backward."""
        return frozenset(
            i for i, layer in enumerate(self.model.layers) if layer.mlp.experts.recompute_gate_up
        )

    def set_kernels(
        self,
        attention: AttentionFn | None = None,
        experts: ExpertsFn | None = None,
        loss: LossFn | None = None,
        norm: NormFn | None = None,
        rotary: RotaryFn | None = None,
        projections: ProjectionsFn | None = None,
    ) -> None:
        """Swap the attention, expert, norm, rotary and / or q/k/v projection computation of every
        layer, and / or the loss (e.g. for GPU kernels); None keeps the current one."""
        for layer in self.model.layers:
            if attention is not None:
                layer.self_attn.attention_fn = attention
            if projections is not None:
                layer.self_attn.projections_fn = projections
            if rotary is not None:
                layer.self_attn.rotary_fn = rotary
            if experts is not None:
                layer.mlp.experts_fn = experts
        if norm is not None:
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.norm_fn = norm
        if loss is not None:
            self.loss_fn = loss


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------


def shift_labels(labels: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Targets aligned with the logits: target[t] = labels[t + 1].

    With position_ids, a token is never asked to predict the first token of the next packed
    document.
    """
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        documents = document_ids(position_ids)
        crosses = documents[:, 1:] != documents[:, :-1]
        targets[:, :-1] = targets[:, :-1].masked_fill(crosses, IGNORE_INDEX)
    return targets


def causal_lm_loss(
    logits: Tensor, labels: Tensor, position_ids: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(sum of next-token cross-entropies in fp32, number of targets); labels -100 are ignored."""
    targets = shift_labels(labels, position_ids).reshape(-1)
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, (targets != IGNORE_INDEX).sum()


def _cross_entropy_sum(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    position_ids: Tensor | None = None,
    chunk_tokens: int = 4096,
) -> tuple[Tensor, Tensor]:
    """`causal_lm_loss` from final hidden states without holding [B, T, V] logits.

    Logits are computed only for the trained tokens, a chunk at a time, and recomputed in backward,
    so the peak is one chunk of [chunk_tokens, V] fp32 logits.
    """
    targets = shift_labels(labels, position_ids).reshape(-1)
    trained = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, trained)
    targets = targets.index_select(0, trained)
    # Starts from the (empty) selection so that a micro-batch without trained tokens still has a
    # graph to run backward through (and DDP still gets a gradient for every parameter).
    loss_sum = hidden.sum(dtype=torch.float32) * 0.0
    for start in range(0, targets.numel(), chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        loss_sum = loss_sum + checkpoint(
            _cross_entropy_sum, hidden[piece], lm_head_weight, targets[piece], use_reentrant=False
        )
    return loss_sum, torch.tensor(targets.numel(), device=targets.device)


EXPERT_WEIGHT_SUFFIXES = tuple(f"mlp.experts.{projection}" for projection in Experts.PROJECTIONS)


def is_expert_weight(name: str) -> bool:
    """Whether `name` (our / transformers' naming) is a stacked expert weight (the tensors MXFP4
    checkpoints store quantized)."""
    return name.endswith(EXPERT_WEIGHT_SUFFIXES)
