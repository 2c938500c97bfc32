"""Per-component timings on the real shapes (`gptoss-tune bench --components`, CUDA only).

One decoder layer's experts, attention, and the loss, forward + backward, each as the eager
reference and as the fast path(s), at the benchmark's micro-batch length. These are the numbers
behind the choices in `gptoss_tune.kernels`: whether compiling the expert epilogues pays, which loss
chunk size is best, what FlexAttention gains over the eager reference.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gptoss_tune.kernels import FastPaths, FlexAttention, FusedLinearCrossEntropy, GroupedExperts
from gptoss_tune.kernels.moe import grouped_mm, sort_by_expert
from gptoss_tune.model.gpt_oss import (
    GptOss,
    chunked_causal_lm_loss,
    document_ids,
    eager_attention,
    eager_experts,
)
from gptoss_tune.model.lora import adapters_to_fp32, apply_lora

if TYPE_CHECKING:
    from gptoss_tune.bench.run import Bench

MIB = 1024**2
EAGER_ATTENTION_MAX_TOKENS = 4096  # the eager reference holds [heads, T, T] fp32 scores
LOSS_CHUNKS = (1024, 2048, 4096, 8192)


def time_forward_backward(
    run: Callable[[], Tensor], device: torch.device, warmup: int = 2, repeats: int = 5
) -> tuple[float, float]:
    """(milliseconds per forward + backward, peak MiB above what was allocated before)."""
    for _ in range(warmup):
        run().backward()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run().backward()
    end.record()
    torch.cuda.synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - before) / MIB
    return start.elapsed_time(end) / repeats, peak


def _timed(name: str, tokens: int, run: Callable[[], Tensor], device: torch.device) -> dict:
    try:
        milliseconds, peak = time_forward_backward(run, device)
        return {"component": name, "tokens": tokens, "ms": round(milliseconds, 2), "peak_mib": round(peak)}
    except torch.OutOfMemoryError:
        return {"component": name, "tokens": tokens, "ms": None, "peak_mib": None, "status": "OOM"}
    finally:
        torch.cuda.empty_cache()


def _model_with_adapters(bench: Bench) -> GptOss:
    model = bench.new_model()  # the shared weights, whatever the expert storage
    adapters_to_fp32(apply_lora(model, bench.options.lora()))
    return model


def expert_timings(model: GptOss, tokens: int, device: torch.device, compiled: GroupedExperts) -> list[dict]:
    """The eager loop, grouped_mm without compiling, `compiled` (the fast path), and the GEMM floor."""
    layer = model.model.layers[0].mlp
    hidden = torch.randn(tokens, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    indices, weights = layer.router(hidden.detach())
    weights = weights.detach().requires_grad_(True)
    grad = torch.randn_like(hidden)

    def run_with(experts_fn) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = experts_fn(layer.experts, hidden, indices, weights)
            return (out.float() * grad).sum()

        return run

    return [
        _timed("experts: eager loop", tokens, run_with(eager_experts), device),
        _timed("experts: grouped_mm", tokens, run_with(GroupedExperts(compile=False)), device),
        _timed("experts: grouped_mm + fast epilogues (Triton on CUDA)", tokens, run_with(compiled), device),
        base_gemm_floor(layer.experts, tokens, indices, device),
    ]


def base_gemm_floor(experts, tokens: int, indices: Tensor, device: torch.device) -> dict:
    """The four base grouped GEMMs of a layer's experts alone (gate_up and down forward, and their
    input gradients), on the same routing: what any grouped-GEMM implementation must spend. The gap
    to the full experts row is routing, LoRA, bias, activation and the weighted sum."""
    routing = sort_by_expert(indices, experts.num_experts)
    gate_up, down = experts.gate_up_weight().bfloat16(), experts.down_weight().bfloat16()
    rows = torch.randn(routing.tokens.numel(), gate_up.shape[1], device=device, dtype=torch.bfloat16)
    activated = torch.randn(rows.shape[0], down.shape[1], device=device, dtype=torch.bfloat16)

    def run() -> None:
        gate_up_out = grouped_mm(rows, gate_up, routing.offsets)
        down_out = grouped_mm(activated, down, routing.offsets)
        grouped_mm(gate_up_out, gate_up.transpose(-2, -1), routing.offsets)
        grouped_mm(down_out, down.transpose(-2, -1), routing.offsets)

    milliseconds = time_calls(run, device)
    flops = 4 * rows.shape[0] * (gate_up.shape[1] * gate_up.shape[2] + down.shape[1] * down.shape[2])
    return {
        "component": f"experts: the 4 base grouped GEMMs alone ({flops / milliseconds / 1e9:,.0f} TFLOP/s)",
        "tokens": tokens,
        "ms": round(milliseconds, 2),
        "peak_mib": None,
    }


def time_calls(run: Callable[[], None], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Milliseconds per call of `run` (no autograd)."""
    with torch.no_grad():
        for _ in range(warmup):
            run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run()
        end.record()
        torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


def attention_timings(
    model: GptOss, tokens: int, device: torch.device, kernels: FastPaths | None
) -> list[dict]:
    """A full-attention layer on packed 1024-token documents: eager (up to 4096 tokens) vs flex."""
    config = model.config
    flex = kernels.attention if kernels is not None and kernels.attention is not None else FlexAttention()
    short = min(tokens, EAGER_ATTENTION_MAX_TOKENS)
    cases = [(short, eager_attention, "attention: eager"), (short, flex, "attention: flex (compiled)")]
    if tokens > short:
        cases.append((tokens, flex, "attention: flex (compiled)"))
    timings = []
    for length, implementation, name in cases:
        query = torch.randn(1, config.num_attention_heads, length, config.head_dim, device=device)
        key, value = (
            torch.randn(1, config.num_key_value_heads, length, config.head_dim, device=device)
            for _ in range(2)
        )
        query, key, value = (t.bfloat16().requires_grad_(True) for t in (query, key, value))
        sinks = torch.randn(config.num_attention_heads, device=device, requires_grad=True)
        documents = document_ids(torch.arange(length, device=device).remainder(1024).unsqueeze(0))

        def run(
            implementation=implementation, query=query, key=key, value=value, sinks=sinks, documents=documents
        ):
            out = implementation(
                query,
                key,
                value,
                sinks,
                scaling=config.head_dim**-0.5,
                sliding_window=None,
                documents=documents,
            )
            return out.float().square().mean()

        timings.append(_timed(f"{name}, full layer, 1024-token documents", length, run, device))
    return timings


def loss_timings(model: GptOss, tokens: int, device: torch.device) -> list[dict]:
    hidden = torch.randn(1, tokens, model.config.hidden_size, device=device, dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    labels = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    weight = model.lm_head.weight

    def run_with(loss_fn) -> Callable[[], Tensor]:
        def run() -> Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total, count = loss_fn(hidden, weight, labels, None)
            return total / count

        return run

    timings = [
        _timed(
            "loss: checkpointed chunks of 4096 (reference)", tokens, run_with(chunked_causal_lm_loss), device
        )
    ]
    for chunk in LOSS_CHUNKS:
        eager = FusedLinearCrossEntropy(chunk, compile=False)
        timings.append(_timed(f"loss: fused, chunks of {chunk}", tokens, run_with(eager), device))
        compiled = FusedLinearCrossEntropy(chunk, compile=True)
        timings.append(
            _timed(
                f"loss: fused + compiled (Triton on CUDA) chunk, chunks of {chunk}",
                tokens,
                run_with(compiled),
                device,
            )
        )
    return timings


def profile_experts(
    model: GptOss, tokens: int, device: torch.device, experts_fn, path: Path, repeats: int = 3
) -> Path:
    """torch.profiler's kernel table of one layer's experts, forward + backward (after one untimed
    run): where the time beyond the base GEMMs goes. Sorted by self device time."""
    from torch.profiler import ProfilerActivity, profile

    layer = model.model.layers[0].mlp
    compute = layer.router.weight.dtype  # the router runs outside autocast, in the weights' dtype
    hidden = torch.randn(tokens, model.config.hidden_size, device=device, dtype=compute, requires_grad=True)
    indices, weights = layer.router(hidden.detach())
    weights = weights.detach().requires_grad_(True)

    def run() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            experts_fn(layer.experts, hidden, indices, weights).float().sum().backward()

    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(repeats):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=30)
    path.write_text(f"experts of one layer, {tokens} tokens, forward + backward x {repeats}\n\n{table}\n")
    return path


def time_components(bench: Bench, profile_path: Path | None = None) -> list[dict]:
    """Timings for the benchmark's micro-batch length (see the module docstring); with
    `profile_path`, also the profiler's kernel table of the fast experts there."""
    device, tokens = bench.device, bench.options.tokens_per_batch
    bench.log("timing components")
    model = _model_with_adapters(bench)
    compiled = bench.kernels.experts if bench.kernels and bench.kernels.experts else GroupedExperts()
    if profile_path is not None:
        bench.log(
            f"profiling the experts -> {profile_experts(model, tokens, device, compiled, profile_path)}"
        )
    timings = expert_timings(model, tokens, device, compiled)
    timings += attention_timings(model, tokens, device, bench.kernels)
    timings += loss_timings(model, tokens, device)
    del model
    torch.cuda.empty_cache()
    return timings
