"""FlashAttention-4 against our tuned FlexAttention on one gpt-oss-20b attention layer at 16k tokens
(64 query heads, 8 key/value heads, 64-wide, bf16), full and 128-token sliding window, on 1024-token
documents and on mixed lengths like Multilingual-Thinking's: forward and forward + backward times,
and how far each is from the fp32 eager reference on the first 2,048 tokens.
A design measurement: `python3 scripts/gpu/attention_backends.py` (needs flash-attn-4 for its rows).
"""

import torch
from attention_masks import TOKENS, documents_of, mixed_lengths
from step_model import attention_inputs, cuda_milliseconds

from gptoss_tune.kernels.attention import FlexAttention
from gptoss_tune.kernels.flash_attention import FlashAttention
from gptoss_tune.model.gpt_oss import eager_attention

WINDOW, DIM = 128, 64
CHECKED = 2048  # tokens compared with the eager reference (it builds a T x T mask)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    query, key, value, sinks, grad = attention_inputs(TOKENS)
    sinks = sinks.detach().bfloat16()  # frozen in LoRA training, in the model's dtype
    backends = {"flex (tuned, compiled)": FlexAttention(compile=True)}
    if FlashAttention.available():
        backends["flash-attention-4"] = FlashAttention(fallback=None)
    else:
        print("flash-attn-4 is not installed: FlexAttention only")
    batches = {
        "1024-token docs": documents_of([1024] * (TOKENS // 1024)),
        "mixed 400-4000": documents_of(mixed_lengths(torch.Generator().manual_seed(1))),
    }
    print(
        "documents, layer, backend: fwd ms, fwd+bwd ms, error vs fp32 eager (out, dq) on the first 2k tokens"
    )
    for batch_name, documents in batches.items():
        for window in (None, WINDOW):
            layer = "full" if window is None else "sliding"
            head = documents[:, :CHECKED]
            fp32 = [t[:, :, :CHECKED].detach().float().requires_grad_() for t in (query, key, value)]
            truth = eager_attention(
                *fp32, sinks.float(), scaling=DIM**-0.5, sliding_window=window, documents=head
            )
            truth.backward(grad[:, :, :CHECKED].float())
            for name, attention in backends.items():
                kwargs = {"scaling": DIM**-0.5, "sliding_window": window, "documents": documents}

                def forward(attention=attention, kwargs=kwargs):
                    with torch.no_grad():
                        attention(query, key, value, sinks, **kwargs)

                def both(attention=attention, kwargs=kwargs):
                    attention(query, key, value, sinks, **kwargs).backward(grad)

                fwd, total = cuda_milliseconds(forward), cuda_milliseconds(both)
                query.grad = None
                small = [t[:, :, :CHECKED].detach().requires_grad_() for t in (query, key, value)]
                out = attention(*small, sinks, scaling=DIM**-0.5, sliding_window=window, documents=head)
                out.backward(grad[:, :, :CHECKED])
                errors = relative_error(out, truth), relative_error(small[0].grad, fp32[0].grad)
                print(
                    f"{batch_name}, {layer}, {name}: {fwd:.3f}, {total:.3f}, "
                    f"out {errors[0]:.2e}, dq {errors[1]:.2e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
