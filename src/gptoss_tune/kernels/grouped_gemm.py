"""The experts' grouped GEMMs: the four base ones (gate_up and down, forward and input gradient)
and the thin ones of their LoRA factors (rank r on one side), including the factors' gradients.

torch's `grouped_mm` (CUTLASS) is the reference and the default. Where the optional `quack-kernels`
package is installed (flash-attn-4 brings it) and the GPU is an H100/H200, its variable-length GEMM
(CuTe DSL) runs them instead: faster at gpt-oss's shapes, and it gathers the token rows of the
sorted assignments as it loads them, so the forward gate_up and the backward down projection need
no separate index_select. In the measurement below its results were bit-identical to grouped_mm's;
tests/gpu compares the two within bf16 tolerance, and both whole expert paths with the fp32 eager
loop.

Measured on one H200 at 16k tokens, top-4 of 32 experts (scripts/gpu/expert_gemms.py), ms per
layer, torch (index_select +) grouped_mm -> quack:
    gate_up forward   3.38 -> 3.10 (128 x 192 ping-pong)
    down forward      1.83 -> 1.46 (128 x 192 ping-pong)
    down backward     2.01 -> 1.51 (128 x 192 ping-pong)
    gate_up backward  3.50 -> 3.00 (256 x 192 cooperative; K = 5760 > N)
and the thin LoRA GEMMs (scripts/gpu/thin_gemms.py, rank 8; bit-identical to grouped_mm):
    s (x A_e) B_e               [S, 8] x [E, 8, 5760]     0.309 -> 0.246 (128 x 192 ping-pong)
    act A'_e                    [S, 2880] x [E, 2880, 8]  0.164 -> 0.102 (128 x 64 ping-pong)
    dG B_e^T                    [S, 5760] x [E, 5760, 8]  0.277 -> 0.185 (128 x 64 ping-pong)
    dB_e = (x A_e)^T dG         per expert, [8, 5760]     0.304 -> 0.285 (128 x 128 ping-pong)
    dA'_e = act^T d(act A'_e)   per expert, [2880, 8]     0.170 -> 0.105 (128 x 64 ping-pong)
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from gptoss_tune.errors import GptossTuneError

EXPERT_GEMMS = ("auto", "quack", "quack-fused", "torch")


def grouped_mm(rows: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """rows [S, K] sorted by group, weights [G, K, N], offsets [G] int32 group ends -> [S, N]."""
    if hasattr(F, "grouped_mm"):  # torch >= 2.10
        return F.grouped_mm(rows, weights, offs=offsets)
    return torch._grouped_mm(rows, weights, offs=offsets)


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


@functools.cache
def quack() -> SimpleNamespace | None:
    """quack's GEMM entry point and its configuration type, or None when quack does not import."""
    try:
        from quack.gemm_config import GemmConfig
        from quack.gemm_interface import gemm_tuned
    except Exception:  # noqa: BLE001 - missing, or a CUDA/DSL mismatch: either way not usable
        return None
    return SimpleNamespace(gemm=gemm_tuned.fn, GemmConfig=GemmConfig)


@functools.cache
def quack_moe():
    """`kernels.quack_moe` (the gate_up GEMM with its epilogue fused), or None where quack's
    epilogue frontend does not import."""
    if quack() is None:
        return None
    try:
        from gptoss_tune.kernels import quack_moe as module
    except Exception:  # noqa: BLE001 - an older quack without the epilogue frontend
        return None
    return module


@functools.cache
def quack_config(inner: int, width: int):
    """The measured sm90 configuration for a [S, inner] x [inner, width] GEMM."""
    if width <= 64:  # a LoRA factor's low-rank side
        return _thin_config(64)
    if inner > width:  # the gate_up input gradient
        return quack().GemmConfig(
            tile_m=256, tile_n=192, pingpong=False, cluster_m=2, cluster_n=1, is_dynamic_persistent=False
        )
    return quack().GemmConfig(
        tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1, is_dynamic_persistent=False
    )


@functools.cache
def _thin_config(tile_n: int):
    return quack().GemmConfig(
        tile_m=128, tile_n=tile_n, pingpong=True, cluster_m=1, cluster_n=1, is_dynamic_persistent=False
    )


def _sixteen_byte_strides(tensor: Tensor) -> bool:
    """One unit stride, every other stride a multiple of 16 bytes (TMA's rule)."""
    strides = tensor.stride()
    return 1 in strides[-2:] and all(s == 1 or (s * tensor.element_size()) % 16 == 0 for s in strides)


@functools.cache
def _is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def _quack_runs_on(source: Tensor) -> bool:
    """quack is installed and measured for bf16 rows on this GPU (an H100/H200: sm90)."""
    return (
        source.is_cuda and source.dtype == torch.bfloat16 and quack() is not None and _is_sm90(source.device)
    )


class ExpertGemm:
    """Runs `source[index] @ weights[e]` for the rows of each expert (`index`: the source row of
    each sorted assignment, or None when `source` already holds the sorted rows).

    `backend`: auto (quack-fused where quack has its epilogue frontend, else quack where it can
    run, else torch), quack (an error where it cannot), quack-fused (quack, and the gate_up
    forward's bias, LoRA term and SwiGLU inside its GEMM, `quack_moe`, instead of a separate
    Triton pass), torch. See docs/benchmarks.md, "Session 10" and "Session 11".
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in EXPERT_GEMMS:
            raise GptossTuneError(f"Unknown expert GEMM backend '{backend}': use {', '.join(EXPERT_GEMMS)}.")
        if backend.startswith("quack") and quack() is None:
            raise GptossTuneError(
                f"--expert-gemm {backend} needs quack-kernels: pip install 'gptoss-tune[fa4]' (it comes with "
                "flash-attn-4)."
            )
        if backend == "quack-fused" and quack_moe() is None:
            raise GptossTuneError(
                "--expert-gemm quack-fused needs quack-kernels with its epilogue frontend (0.6.5 or later)."
            )
        self.fuse_epilogues = backend == "quack-fused" or (backend == "auto" and quack_moe() is not None)
        self.backend = "quack" if backend == "quack-fused" else backend

    def describe(self) -> str:
        if self.backend != "torch" and quack() is not None:
            fused = " (gate_up with its SwiGLU epilogue fused)" if self.fuse_epilogues else ""
            where = " on sm90, else grouped_mm" if self.backend == "auto" else ""
            return f"quack GEMMs{fused}{where}"
        return "grouped_mm"

    def fuses(self, source: Tensor) -> bool:
        """Whether the gate_up forward runs with its epilogue fused (`quack_moe`) for bf16 expert
        weights and these token rows."""
        return self.fuse_epilogues and _quack_runs_on(source) and _sixteen_byte_strides(source)

    @staticmethod
    def quack_can_run(*operands: Tensor) -> bool:
        return all(_quack_runs_on(operand) and _sixteen_byte_strides(operand) for operand in operands)

    def _runs_quack(self, *operands: Tensor) -> bool:
        """Whether quack takes these operands (an error for `quack` where it cannot)."""
        if self.backend == "torch":
            return False
        if self.quack_can_run(*operands):
            return True
        if self.backend == "quack":
            raise GptossTuneError(
                "--expert-gemm quack runs bf16 experts on an H100/H200 (sm90) only: use auto or torch."
            )
        return False

    def __call__(
        self, source: Tensor, weights: Tensor, offsets: Tensor, cu_seqlens: Tensor, index: Tensor | None
    ) -> Tensor:
        """offsets [E] int32 group ends (grouped_mm's), cu_seqlens [E + 1] int32 (quack's); index
        int32 for quack, any integer dtype for torch."""
        if not self._runs_quack(source, weights):
            rows = source.index_select(0, index) if index is not None else source
            return grouped_mm(rows, weights, offsets)
        total = index.numel() if index is not None else source.shape[0]
        inner, width = weights.shape[-2:]
        out = torch.empty(total, width, dtype=source.dtype, device=source.device)
        if total == 0:  # quack's tile scheduler divides by the row count
            return out
        quack().gemm(
            source, weights, out, cu_seqlens_m=cu_seqlens, A_idx=index, config=quack_config(inner, width)
        )
        return out

    def weight_grad(self, inputs: Tensor, grads: Tensor, offsets: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Each expert's sum over its rows of inputs_s^T grads_s: [S, K] and [S, N] sorted rows ->
        [E, K, N] (the gradient of the weights of `self(inputs, weights, ...)`); zeros for an expert
        without rows."""
        if not self._runs_quack(inputs.t(), grads):
            return grouped_mm(inputs.t(), grads, offsets)
        width = grads.shape[1]
        out = grads.new_zeros(offsets.numel(), inputs.shape[1], width)
        if inputs.shape[0] > 0:
            quack().gemm(
                inputs.t(),
                grads,
                out,
                cu_seqlens_k=cu_seqlens,
                config=_thin_config(64 if width <= 64 else 128),
            )
        return out
