"""FlexAttention's mask function and tile options for the full-attention and the 128-token
sliding-window layers of gpt-oss-20b at 16k tokens (64 query heads, 8 key/value heads, 64-wide), on
1024-token documents and on mixed lengths like Multilingual-Thinking's. The kernel evaluates the
mask function on every pair of a partial tile: the earlier one loaded both tokens' documents and
made three comparisons, the current one (`kernels.attention.lower_bound_mask_mod`) loads one bound
per query row and makes two. The sliding layers meet only partial tiles.
A design measurement: `python3 scripts/gpu/attention_masks.py`."""

import torch
from step_model import attention_inputs, cuda_milliseconds
from torch.nn.attention.flex_attention import BlockMask

from gptoss_tune.kernels.attention import SM90_HEAD_DIM_64_OPTIONS, attend_with_sinks, build_block_mask
from gptoss_tune.model.gpt_oss import document_ids

TOKENS, HEADS, KV_HEADS, DIM, WINDOW = 16384, 64, 8, 64, 128
TUNED = SM90_HEAD_DIM_64_OPTIONS
FWD = {k: v for k, v in TUNED.items() if k.startswith("fwd")}
BWD = {k: v for k, v in TUNED.items() if k.startswith("bwd")}
CANDIDATES = [  # (name, mask function, kernel options)
    ("documents mask (before), tuned", "documents", TUNED),
    ("lower-bound mask, tuned", "lower", TUNED),
    ("lower, bwd 64,128,128,64 s3 w8", "lower", {**FWD, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128,
                                                   "bwd_BLOCK_N2": 64, "bwd_num_stages": 3, "bwd_num_warps": 8}),
    ("lower, bwd 64s s2 w4", "lower", {**FWD, **BWD, "bwd_num_stages": 2}),
    ("lower, bwd 32,64,64,32 s3 w4", "lower", {**FWD, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                                 "bwd_BLOCK_N2": 32, "bwd_num_stages": 3, "bwd_num_warps": 4}),
    ("lower, fwd 64x64 s3 w4", "lower", {**BWD, "fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4}),
    ("lower, fwd 128x128 s2 w8", "lower", {**BWD, "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_stages": 2, "fwd_num_warps": 8}),
]  # fmt: skip


def documents_block_mask(documents: torch.Tensor, window: int | None) -> BlockMask:
    """The block mask of before: the same tiles, with the mask function on both tokens' documents."""

    def mask_mod(batch, head, q_idx, kv_idx):
        visible = (kv_idx <= q_idx) & (documents[batch, q_idx] == documents[batch, kv_idx])
        return visible if window is None else visible & (q_idx - kv_idx < window)

    mask = build_block_mask(documents, window)
    mask.mask_mod = mask_mod
    return mask


def mixed_lengths(generator: torch.Generator) -> list[int]:
    lengths, total = [], 0
    while total < TOKENS:
        length = int(torch.randint(400, 4000, (1,), generator=generator))
        lengths.append(min(length, TOKENS - total))
        total += lengths[-1]
    return lengths


def documents_of(lengths: list[int]) -> torch.Tensor:
    return document_ids(torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda())


def main() -> None:
    query, key, value, sinks, grad = attention_inputs(TOKENS, HEADS, KV_HEADS, DIM)
    batches = {
        "1024-token docs": documents_of([1024] * (TOKENS // 1024)),
        "mixed 400-4000": documents_of(mixed_lengths(torch.Generator().manual_seed(1))),
    }
    references: dict = {}
    print("documents, layer, candidate: fwd ms, fwd+bwd ms, max |out - first's|, max |dq - first's|")
    for name, mask_kind, options in CANDIDATES:
        compiled = torch.compile(attend_with_sinks)
        for batch_name, documents in batches.items():
            for window in (None, WINDOW):
                layer = "full" if window is None else "sliding"
                try:
                    build = documents_block_mask if mask_kind == "documents" else build_block_mask
                    mask = build(documents, window)

                    def forward(mask=mask, options=options, compiled=compiled):
                        with torch.no_grad():
                            compiled(query, key, value, sinks, mask, DIM**-0.5, options)

                    def both(mask=mask, options=options, compiled=compiled):
                        compiled(query, key, value, sinks, mask, DIM**-0.5, options).backward(grad)

                    fwd, total = cuda_milliseconds(forward), cuda_milliseconds(both, repeats=10)
                    query.grad = None
                    out = compiled(query, key, value, sinks, mask, DIM**-0.5, options)
                    out.backward(grad)
                    result = (out.detach().float(), query.grad.float())
                    query.grad = key.grad = value.grad = sinks.grad = None
                    reference = references.setdefault((batch_name, window), result)
                    errors = [(a - b).abs().max().item() for a, b in zip(result, reference, strict=True)]
                    print(f"  {batch_name:16s} {layer:8s} {name:34s} {fwd:7.3f} {total:7.3f} "
                          f"{errors[0]:.2e} {errors[1]:.2e}", flush=True)  # fmt: skip
                except Exception as exc:  # a configuration the kernel cannot take: say so and go on
                    print(f"  {batch_name} {layer} {name} failed: {type(exc).__name__}: {str(exc)[:200]}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
