"""GPU fast paths for our gpt-oss model, each checked against the eager reference in the model file.

- `attention.FlexAttention`: FlexAttention with sinks, sliding windows and packed documents.
- `flash_attention.FlashAttention`: FlashAttention-4's variable-length kernel with sinks, where the
  optional `flash-attn-4` package is installed (sm90 / sm100); FlexAttention takes what it cannot.
- `moe.GroupedExperts`: grouped-GEMM experts with the LoRA on the low-rank side, fused epilogues;
  its base GEMMs are `grouped_gemm.ExpertGemm`'s (quack's variable-length GEMM, gathering token rows
  as it loads them, where the optional `quack-kernels` is installed on sm90; torch's grouped_mm else).
- `projections.StackedProjections`: the query, key and value projections with their LoRAs as one
  GEMM each way.
- `loss.FusedLinearCrossEntropy`: chunked linear cross-entropy that computes the hidden gradient
  in forward (two lm_head GEMMs per trained token instead of three).
- `memory.plan_activation_checkpointing`: recompute in backward only what the memory budget needs
  (whole layers, or only the experts' gate_up projection, whichever costs less time).
- compiled RMSNorm and rotary embedding (`torch.compile` of the model's own functions): one kernel
  each way instead of a chain of elementwise ones between the GEMMs.

`enable_fast_paths(model)` installs them (and, compiled, the one-kernel MXFP4 dequantization);
call it after the adapters are attached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.kernels.attention import FlexAttention
from gptoss_tune.kernels.flash_attention import FlashAttention
from gptoss_tune.kernels.grouped_gemm import EXPERT_GEMMS, ExpertGemm
from gptoss_tune.kernels.loss import DEFAULT_CHUNK_TOKENS, FusedLinearCrossEntropy
from gptoss_tune.kernels.memory import RECOMPUTE_POLICIES, RecomputePlan, plan_activation_checkpointing
from gptoss_tune.kernels.moe import GroupedExperts
from gptoss_tune.kernels.projections import StackedProjections
from gptoss_tune.model.gpt_oss import GptOss, NormFn, RotaryFn, rms_norm, rotate_query_key
from gptoss_tune.model.mxfp4 import compiled_dequantize_experts

ATTENTION_BACKENDS = ("auto", "flash", "flex")

__all__ = [
    "ATTENTION_BACKENDS",
    "EXPERT_GEMMS",
    "ExpertGemm",
    "FastPaths",
    "FlashAttention",
    "FlexAttention",
    "FusedLinearCrossEntropy",
    "GroupedExperts",
    "RECOMPUTE_POLICIES",
    "RecomputePlan",
    "StackedProjections",
    "compile_mxfp4_dequantization",
    "enable_fast_paths",
    "make_attention",
    "plan_activation_checkpointing",
]


@dataclass(frozen=True)
class FastPaths:
    """What `enable_fast_paths` installed (None: that part kept its eager reference)."""

    attention: FlashAttention | FlexAttention | None
    experts: GroupedExperts | None
    loss: FusedLinearCrossEntropy | None
    norm: NormFn | None = None
    rotary: RotaryFn | None = None
    projections: StackedProjections | None = None

    def install(self, model: GptOss) -> None:
        model.set_kernels(self.attention, self.experts, self.loss, self.norm, self.rotary, self.projections)

    def describe(self) -> str:
        parts = []
        if isinstance(self.attention, FlashAttention):
            parts.append("flash attention 4")
        elif self.attention is not None:
            parts.append("flex attention" + (" (compiled)" if self.attention.compiled else ""))
        if self.experts is not None:
            parts.append(
                f"grouped experts ({self.experts.gemm.describe()}"
                + (", Triton or compiled epilogues)" if self.experts.compiled else ")")
            )
        if self.projections is not None:
            parts.append("stacked q/k/v projections")
        if self.loss is not None:
            parts.append(f"fused linear cross-entropy ({self.loss.chunk_tokens}-token chunks)")
        if self.norm is not None or self.rotary is not None:
            parts.append("compiled norms and rotary")
        return ", ".join(parts) or "eager"


def enable_fast_paths(
    model: GptOss,
    *,
    attention: bool = True,
    experts: bool = True,
    projections: bool = True,
    loss: bool = True,
    compile: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    attention_backend: str = "auto",
    expert_gemm: str = "auto",
) -> FastPaths:
    """Swap the model's attention, experts, q/k/v projections and loss for the fast paths (shapes they cannot take
    still go through the eager reference). `compile` applies torch.compile where it pays: the
    FlexAttention kernel (on CUDA), the experts' elementwise epilogues, the loss chunk, the norms
    and the rotary embedding. `attention_backend`: see `make_attention`; `expert_gemm`: the experts'
    GEMMs, auto (quack-fused where quack is installed, on an H100/H200), quack, quack-fused or torch
    (grouped_mm)."""
    installed = FastPaths(
        attention=make_attention(attention_backend, compile) if attention else None,
        experts=GroupedExperts(compile=compile, gemm=ExpertGemm(expert_gemm)) if experts else None,
        loss=FusedLinearCrossEntropy(loss_chunk_tokens, compile=compile) if loss else None,
        # Automatic dynamic shapes (compiled static first; only a size that changes becomes dynamic):
        # with dynamic=True the hidden and head sizes were symbolic too, and the rotary kernel's
        # runtime index divisions made it ~10x slower than its memory traffic.
        norm=torch.compile(rms_norm) if compile else None,
        rotary=torch.compile(rotate_query_key) if compile else None,
        projections=StackedProjections() if projections else None,
    )
    installed.install(model)
    if compile:
        compile_mxfp4_dequantization(model)
    return installed


def make_attention(backend: str = "auto", compile: bool = True) -> FlashAttention | FlexAttention:
    """auto: FlashAttention-4 where it is installed (FlexAttention for the calls it cannot take),
    else FlexAttention. flash: FlashAttention-4 or an error saying how to install it. flex:
    FlexAttention."""
    if backend not in ATTENTION_BACKENDS:
        raise GptossTuneError(f"Unknown attention backend '{backend}': use {', '.join(ATTENTION_BACKENDS)}.")
    flex = FlexAttention(compile=compile)
    if backend == "flex" or (backend == "auto" and not FlashAttention.available()):
        return flex
    if not FlashAttention.available():
        raise GptossTuneError(
            "--attention flash needs FlashAttention-4: pip install 'gptoss-tune[fa4]' "
            "(or flash-attn-4 with nvidia-cutlass-dsl[cu13] for a CUDA 13 torch)."
        )
    return FlashAttention(fallback=flex)


def compile_mxfp4_dequantization(model: GptOss) -> bool:
    """MXFP4-stored experts dequantize each layer in one compiled kernel (bit-identical to the eager
    one, several times faster: it runs for every layer in forward, backward and recompute).
    Returns whether any layer stores MXFP4 experts on a GPU (on a CPU the eager one stays)."""
    found = False
    for layer in model.model.layers:
        experts = layer.mlp.experts
        on_gpu = experts.gate_up_proj_bias.device.type == "cuda"
        if on_gpu and any(experts.is_mxfp4(name) for name in experts.PROJECTIONS):
            experts.dequantize_fn = compiled_dequantize_experts
            found = True
    return found
