"""Selective activation checkpointing: recompute only as many layers as the memory budget needs.

A layer that is not checkpointed keeps its activations for backward; a checkpointed one keeps only
its input and recomputes the rest in backward (one extra forward of that layer). On the GPU the
cost of both is measured on one real layer at the micro-batch's length (`measure_layer_memory`),
then `choose_checkpointed_layers` leaves as many layers un-checkpointed as fit:

    peak ~ now_allocated + optimizer + loss + transient + n * saved + (L - n) * checkpointed  <= budget

where the loss's peak is measured too (`measure_loss_memory`: the installed loss function on
`tokens` trained positions), so a loss that keeps less (the Triton chunk writes its gradient over
its logits) leaves more room for activations.

The first layers are the ones recomputed (any choice gives the same peak; all activations are
alive when backward starts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptoss_tune.model.gpt_oss import GptOss, document_ids

GIB = 1024**3
ADAM_STATE_COPIES = 3  # gradient + two moments, fp32 like the adapters
AUTO_HEADROOM = 0.08  # of the GPU's memory, kept free by an "auto" budget (allocator slack, NCCL buffers)


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one decoder layer needs at a given micro-batch length."""

    saved: int  # activations kept for backward when the layer is not checkpointed
    checkpointed: int  # kept when it is checkpointed: its input
    transient: int  # extra peak while the layer runs its forward and backward


def choose_checkpointed_layers(num_layers: int, layer: LayerMemory, available: int) -> list[int]:
    """Indices of the layers to checkpoint so that kept activations fit in `available` bytes.

    Every layer is checkpointed when even that does not fit (the caller reports the shortfall).
    """
    extra = max(layer.saved - layer.checkpointed, 0)
    room = available - num_layers * layer.checkpointed
    kept = num_layers if extra == 0 else min(num_layers, max(room, 0) // extra)
    return list(range(num_layers - int(kept)))


def _lora_parameter_bytes(model: GptOss) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def measure_loss_memory(model: GptOss, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak bytes of the model's loss (`model.loss_fn`, whichever is installed) forward and backward
    over `tokens` trained positions (CUDA), beyond its input. Like `measure_layer_memory`, a first
    unmeasured run warms up its kernels."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError("measure_loss_memory needs the model on a CUDA device")
    config = model.config
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    position_ids = torch.arange(tokens, device=device).unsqueeze(0)
    peak = 0
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        for _warmup_then_measure in range(2):
            before = _start_measuring(device)
            loss_sum, count = model.loss_fn(hidden, model.lm_head.weight, labels, position_ids)
            (loss_sum / count).backward()
            peak = _peak_since(device, before)
            hidden.grad = None
            del loss_sum, count
    return peak


def _start_measuring(device: torch.device) -> int:
    """Bytes allocated now, with the peak counter reset to them."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_since(device: torch.device, before: int) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def _random_layer_inputs(model: GptOss, tokens: int, dtype: torch.dtype, device: torch.device):
    config = model.config
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=True)
    position_ids = torch.arange(tokens, device=device).unsqueeze(0)
    cos, sin = model.model.rotary(position_ids, dtype)
    return hidden, cos, sin, document_ids(position_ids)


def measure_layer_memory(
    model: GptOss, tokens: int, dtype: torch.dtype = torch.bfloat16, layer_index: int = 0
) -> LayerMemory:
    """Run one layer forward and backward on random input (CUDA) and measure what it keeps and its
    transient peak. Leaves no gradient behind. A first, unmeasured run warms up (compiles) the
    layer's kernels and settles their caches (e.g. a block mask replaced during the measured
    forward would otherwise count as negative memory)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError("measure_layer_memory needs the model on a CUDA device")
    layer = model.model.layers[layer_index]
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        hidden, cos, sin, documents = _random_layer_inputs(model, tokens, dtype, device)
        for _warmup_then_measure in range(2):
            saved, peak = _layer_forward_backward_bytes(layer, hidden, cos, sin, documents)
    checkpointed = tokens * model.config.hidden_size * dtype.itemsize
    return LayerMemory(saved=max(saved, 0), checkpointed=checkpointed, transient=max(peak - saved, 0))


def _layer_forward_backward_bytes(
    layer: torch.nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, documents: Tensor
) -> tuple[int, int]:
    """(bytes kept from forward to backward beyond the output, peak bytes of forward + backward)."""
    device = hidden.device
    before = _start_measuring(device)
    output: Tensor = layer(hidden, cos, sin, documents)
    torch.cuda.synchronize(device)
    saved = torch.cuda.memory_allocated(device) - before - output.numel() * output.element_size()
    output.backward(torch.randn_like(output))
    peak = _peak_since(device, before)
    hidden.grad = None
    for param in layer.parameters():
        param.grad = None
    return saved, peak


def auto_budget_bytes(device: torch.device) -> int:
    """What this process holds (allocated or cached by PyTorch's allocator) plus what the GPU has
    free, less AUTO_HEADROOM of its total; memory of other processes is not counted."""
    free, total = torch.cuda.mem_get_info(device)
    return int(torch.cuda.memory_reserved(device) + free - AUTO_HEADROOM * total)


def plan_activation_checkpointing(
    model: GptOss,
    tokens: int,
    budget_bytes: int,
    dtype: torch.dtype = torch.bfloat16,
) -> list[int]:
    """Measure, choose and apply: returns the checkpointed layer indices (set on the model)."""
    device = next(model.parameters()).device
    layer = measure_layer_memory(model, tokens, dtype)
    optimizer = ADAM_STATE_COPIES * _lora_parameter_bytes(model)
    fixed = torch.cuda.memory_allocated(device) + optimizer + measure_loss_memory(model, tokens, dtype)
    available = budget_bytes - fixed - layer.transient
    layers = choose_checkpointed_layers(len(model.model.layers), layer, available)
    model.set_gradient_checkpointing(layers)
    return layers
