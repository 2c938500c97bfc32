"""The experts' gate_up GEMM with its epilogue fused: bias, LoRA term and SwiGLU (quack's
epilogue mods).

Imported only where quack-kernels imports (see `grouped_gemm.quack_moe`); used with
`--expert-gemm auto` (the default) or `quack-fused` (see `grouped_gemm.ExpertGemm`). Where quack
runs the experts' base GEMMs (sm90, bf16), the gate_up forward's memory-bound pass need not be a
separate kernel: the GEMM's epilogue adds the expert's bias and the LoRA term to the accumulator, writes the
pre-activation (saved for backward) and writes the clamped SwiGLU of it beside it. The Triton
epilogue it replaces read the [S, 2I] base product back and wrote both again.

The LoRA term s (x A_e) B_e comes in as the GEMM's addend (C), computed by one thin grouped GEMM
([S, r] x [E, r, 2I]), for any rank. Measured on one H200, one gpt-oss-20b layer at 16k tokens
(`scripts/gpu/fused_epilogues.py`): the GEMM with the Triton epilogue 4.00 ms; fused 3.40 ms plus
0.34 ms for the addend (3.20 ms without an adapter). Rank-8 LoRA terms done in the epilogue itself
(8 per-row and 8 per-expert vectors) ran at 7.5 ms with 128 x 192 tiles (3.9 ms with 128 x 128),
and the down projection's backward with the SwiGLU backward fused was no faster than the GEMM plus
the Triton pass (2.10 against 2.15 ms): neither was kept.

The reference is `gate_up_epilogue` in `kernels.moe` (tests/gpu compares the whole experts with and
without this, and with the fp32 eager loop). One difference in rounding: the activation here comes
from the fp32 pre-activation before it is rounded to bf16 for saving; backward recomputes it from
the saved bf16 values, as with the Triton epilogue.
"""

from __future__ import annotations

import functools

from quack.activation import swiglu_oai
from quack.epilogue.frontend import gemm_epilogue
from quack.epilogue.math import pack, unpack
from quack.epilogue.ops import RowVecLoad
from torch import Tensor

# The bias is a per-expert row vector; inference could take it for a column when S == 2I.
_PINS = {"bias": RowVecLoad("bias")}


@functools.cache
def gate_up_mod(alpha: float, limit: float, with_addend: bool):
    """D = acc + bias (+ c), written back as the (gate, up) pairs; postact = clamped SwiGLU(D)."""
    if with_addend:

        @gemm_epilogue(outputs=("postact",), ops=_PINS, mode="acc_pair")
        def gate_up_addend_swiglu(acc, c, bias):
            gate, up = unpack(acc + bias + c)
            return {"D": pack(gate, up), "postact": swiglu_oai(gate, up, alpha, limit)}

        return gate_up_addend_swiglu

    @gemm_epilogue(outputs=("postact",), ops=_PINS, mode="acc_pair")
    def gate_up_swiglu(acc, bias):
        gate, up = unpack(acc + bias)
        return {"D": pack(gate, up), "postact": swiglu_oai(gate, up, alpha, limit)}

    return gate_up_swiglu


def gate_up_swiglu(
    tokens: Tensor,
    index: Tensor,
    weights: Tensor,
    bias: Tensor,
    cu_seqlens: Tensor,
    addend: Tensor | None,
    alpha: float,
    limit: float,
    config,
) -> tuple[Tensor, Tensor]:
    """(pre-activation [S, 2I], activation [S, I]) of the sorted rows: the token rows [N, H]
    gathered by `index` [S] int32, times weights [E, H, 2I] per expert (`cu_seqlens` [E + 1] int32),
    + bias [E, 2I] + `addend` [S, 2I] (the LoRA term, or None)."""
    rows, width = index.numel(), weights.shape[-1]
    preact = tokens.new_empty(rows, width)
    act = tokens.new_empty(rows, width // 2)
    if rows == 0:  # quack's tile scheduler divides by the row count
        return preact, act
    gate_up_mod(alpha, limit, addend is not None)(
        tokens, weights, addend, out={"D": preact, "postact": act}, config=config, tuned=False,
        cu_seqlens_m=cu_seqlens, A_idx=index, bias=bias.to(tokens.dtype),
    )  # fmt: skip
    return preact, act
