"""Block sizes for the kernels a 20b layer spends its memory-bound time in, at 16k tokens:
`python3 scripts/gpu/tune_kernels.py epilogues|attention`. A design measurement: the winners are
written into the code as constants (moe_triton's blocks, attention's kernel options for sm90)."""

import sys

import torch
import triton
from step_model import attention_inputs, cuda_milliseconds
from torch.nn.attention.flex_attention import flex_attention

from gptoss_tune.kernels import moe, moe_triton
from gptoss_tune.kernels.attention import FlexAttention
from gptoss_tune.model.gpt_oss import document_ids

ROWS, INNER, HIDDEN, EXPERTS, RANK = 65536, 2880, 2880, 32, 8


def epilogues() -> None:
    g = torch.Generator("cuda").manual_seed(0)
    indices = torch.rand(ROWS // 4, EXPERTS, generator=g, device="cuda").argsort(-1)[:, :4]
    routing = moe.sort_by_expert(indices, EXPERTS)
    base = torch.randn(ROWS, 2 * INNER, generator=g, device="cuda").bfloat16()
    bias = torch.randn(EXPERTS, 2 * INNER, generator=g, device="cuda").bfloat16()
    inputs = torch.randn(ROWS, RANK, generator=g, device="cuda").bfloat16()
    factor = torch.randn(EXPERTS, RANK, 2 * INNER, generator=g, device="cuda").bfloat16()
    down_factor = torch.randn(EXPERTS, RANK, INNER, generator=g, device="cuda").bfloat16()
    grad_base = torch.randn(ROWS, INNER, generator=g, device="cuda").bfloat16()
    weights = torch.rand(ROWS, generator=g, device="cuda").bfloat16()
    gate_up, act = torch.empty_like(base), base.new_empty(ROWS, INNER)
    grad_gate_up, base_dot = torch.empty_like(base), torch.empty(ROWS, device="cuda")
    words = base.view(torch.int32)
    traffic_forward = base.numel() * 2 * 2 + act.numel() * 2  # read base, write gate_up and act
    traffic_backward = base.numel() * 2 * 2 + grad_base.numel() * 2 * 2  # gate_up, grad in; grad, act out
    print("gate_up forward: rows pairs warps ms GB/s")
    for block_rows, block_pairs, warps in [
        (16, 128, 4), (8, 256, 4), (32, 128, 8), (16, 256, 8), (64, 64, 4), (4, 512, 4), (32, 64, 4),
        (16, 128, 8), (8, 128, 4), (32, 256, 8), (64, 128, 8), (16, 64, 4),
    ]:  # fmt: skip

        def run(block_rows=block_rows, block_pairs=block_pairs, warps=warps):
            moe_triton._gate_up_forward_kernel[(triton.cdiv(ROWS, block_rows), triton.cdiv(INNER, block_pairs))](
                words, inputs, factor.view(torch.int32), bias.view(torch.int32), routing.experts,
                gate_up.view(torch.int32), act, ROWS, INNER, 2.0, 1.702, 7.0,
                RANK=RANK, BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs, num_warps=warps,
            )  # fmt: skip

        ms = cuda_milliseconds(run)
        print(f"  {block_rows:3d} {block_pairs:4d} {warps:2d} {ms:7.3f} {traffic_forward / ms / 1e6:7.0f}")
    print("activation backward: rows pairs warps ms GB/s")
    for block_rows, block_pairs, warps in [
        (8, 128, 4), (4, 128, 4), (16, 128, 4), (8, 256, 4), (8, 256, 8), (16, 256, 8), (4, 256, 4),
        (32, 128, 8), (16, 64, 4), (2, 512, 4), (4, 512, 8), (1, 1024, 4),
    ]:  # fmt: skip

        def run(block_rows=block_rows, block_pairs=block_pairs, warps=warps):
            moe_triton._activation_backward_kernel[(triton.cdiv(ROWS, block_rows),)](
                words, grad_base, inputs, down_factor, routing.experts, weights,
                grad_gate_up.view(torch.int32), base_dot, act, ROWS, INNER, 1.702, 7.0,
                RANK=RANK, BLOCK_ROWS=block_rows, BLOCK_PAIRS=block_pairs, num_warps=warps,
            )  # fmt: skip

        ms = cuda_milliseconds(run)
        print(f"  {block_rows:3d} {block_pairs:4d} {warps:2d} {ms:7.3f} {traffic_backward / ms / 1e6:7.0f}")
    rows = torch.randn(ROWS, HIDDEN, generator=g, device="cuda").bfloat16()
    out = torch.empty(ROWS // 4, HIDDEN, device="cuda", dtype=torch.bfloat16)
    print("token sum (weighted, bf16 out): tokens cols warps ms GB/s")
    traffic_sum = rows.numel() * 2 + out.numel() * 2
    for block_tokens, block_cols, warps in [
        (16, 256, 4),
        (8, 256, 4),
        (32, 256, 8),
        (16, 512, 8),
        (8, 512, 4),
        (4, 1024, 4),
    ]:

        def run(block_tokens=block_tokens, block_cols=block_cols, warps=warps):
            moe_triton._token_sum_kernel[(triton.cdiv(ROWS // 4, block_tokens), triton.cdiv(HIDDEN, block_cols))](
                rows, routing.inverse, bias, routing.experts, weights, rows, out, ROWS // 4, HIDDEN,
                TOP_K=4, WEIGHTED=True, ADDEND=False, BLOCK_TOKENS=block_tokens, BLOCK_COLS=block_cols,
                num_warps=warps,
            )  # fmt: skip

        ms = cuda_milliseconds(run)
        print(f"  {block_tokens:3d} {block_cols:4d} {warps:2d} {ms:7.3f} {traffic_sum / ms / 1e6:7.0f}")


def attention() -> None:
    tokens, dim = 16384, 64
    query, key, value, sinks, grad = attention_inputs(tokens, dim=dim)
    documents = document_ids(torch.arange(tokens, device="cuda").remainder(1024).unsqueeze(0))
    masks = FlexAttention(compile=False)
    reference = None

    def attend(q, k, v, s, block_mask, options):
        out, aux = flex_attention(
            q, k, v, block_mask=block_mask, scale=dim**-0.5, enable_gqa=True,
            return_aux=torch.nn.attention.flex_attention.AuxRequest(lse=True), kernel_options=options,
        )  # fmt: skip
        keep = torch.sigmoid(aux.lse - s.float().view(1, -1, 1))
        return (out.float() * keep.unsqueeze(-1)).to(v.dtype)

    candidates = [
        ("default", None),
        ("fwd 128x64 s3 w4", {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4}),
        ("fwd 128x128 s2 w8", {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2, "fwd_num_warps": 8}),
        ("fwd 64x128 s3 w4", {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128, "fwd_num_stages": 3, "fwd_num_warps": 4}),
        ("fwd TMA", {"fwd_USE_TMA": True}),
        ("bwd 64,64,64,64 s3 w4", {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64, "bwd_num_stages": 3, "bwd_num_warps": 4}),
        ("bwd 32,128,128,32 s3 w4", {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32, "bwd_num_stages": 3, "bwd_num_warps": 4}),
        ("bwd 64,128,128,64 s2 w8", {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_stages": 2, "bwd_num_warps": 8}),
        ("bwd 64,128,128,64 s4 w8", {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_stages": 4, "bwd_num_warps": 8}),
        ("bwd 32,64,64,32 s4 w4", {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32, "bwd_num_stages": 4, "bwd_num_warps": 4}),
        ("bwd 64,128,128,64 s3 w4", {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64, "bwd_num_stages": 3, "bwd_num_warps": 4}),
    ]  # fmt: skip
    print(
        "attention, 1024-token documents, 16k tokens: options, full fwd ms, full fwd+bwd ms, sliding fwd+bwd ms, max err"
    )
    for name, options in candidates:
        compiled = torch.compile(attend)
        try:
            row = []
            for window in (None, 128):
                mask = masks.block_mask(documents, window)

                def forward(mask=mask, compiled=compiled, options=options):
                    with torch.no_grad():
                        compiled(query, key, value, sinks, mask, options)

                def both(mask=mask, compiled=compiled, options=options):
                    out = compiled(query, key, value, sinks, mask, options)
                    out.backward(grad)

                if window is None:
                    row.append(cuda_milliseconds(forward))
                row.append(cuda_milliseconds(both, repeats=10))
            out = compiled(query, key, value, sinks, masks.block_mask(documents, None), options)
            if reference is None:
                reference = out.detach()
            error = (out.detach().float() - reference.float()).abs().max().item()
            print(f"  {name:26s} {row[0]:7.3f} {row[1]:7.3f} {row[2]:7.3f} {error:.2e}")
        except Exception as exc:  # a config the kernel cannot take: say so and go on
            print(f"  {name:26s} failed: {type(exc).__name__}: {str(exc)[:200]}")
        torch._dynamo.reset()


if __name__ == "__main__":
    {"epilogues": epilogues, "attention": attention}[sys.argv[1]]()
