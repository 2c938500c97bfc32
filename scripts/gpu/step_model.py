"""What the design scripts here share: a gpt-oss-20b-shaped model cut to `layers`, random bf16
weights, LoRA r=8 on attention and experts, our fast paths, one packed micro-batch of 1024-token
documents, and GPU timing (of whole forward + backward steps, or of any call)."""

import torch

from gptoss_tune.bench.run import bench_config
from gptoss_tune.bench.weights import random_model
from gptoss_tune.kernels import enable_fast_paths
from gptoss_tune.model.lora import LoraOptions, adapters_to_fp32, apply_lora


class StepModel:
    def __init__(self, layers: int, tokens: int) -> None:
        self.config = bench_config("20b", layers)
        self.model = random_model(self.config, "cuda", storage="bf16")
        options = LoraOptions.from_strings(rank=8, alpha=16, targets="attn,experts")
        self.params = list(adapters_to_fp32(apply_lora(self.model, options)).values())
        enable_fast_paths(self.model)
        self.input_ids = torch.randint(0, self.config.vocab_size, (1, tokens), device="cuda")
        self.position_ids = torch.arange(tokens, device="cuda").remainder(1024).unsqueeze(0)
        self.labels: torch.Tensor | None = None  # None: every token is trained (labels = input_ids)
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=True)

    def loss(self) -> torch.Tensor:
        labels = self.input_ids if self.labels is None else self.labels
        with torch.autocast("cuda", dtype=torch.bfloat16):
            total, count = self.model.loss(self.input_ids, labels, self.position_ids)
        return total / count

    def step(self) -> None:
        self.loss().backward()

    def train_step(self) -> None:
        """A whole optimizer step as the bench takes it: forward + backward, clip, fused AdamW, and
        the loss read back (a host synchronization)."""
        loss = self.loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        float(loss.detach())

    def milliseconds(self, step=None, warmup: int = 3, repeats: int = 3) -> float:
        """GPU time of `step` (default: forward + backward), after `warmup` untimed ones."""
        return cuda_milliseconds(step or self.step, warmup=warmup, repeats=repeats)


def cuda_milliseconds(fn, *args, warmup: int = 3, repeats: int = 20) -> float:
    """Mean GPU time of fn(*args) over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def attention_inputs(tokens: int = 16384, heads: int = 64, kv_heads: int = 8, dim: int = 64):
    """(query, key, value, sinks, output gradient) of one gpt-oss-20b attention layer over one
    packed row, random bf16, leaves that need gradients."""
    g = torch.Generator("cuda").manual_seed(0)
    query = torch.randn(1, heads, tokens, dim, generator=g, device="cuda").bfloat16().requires_grad_()
    key, value = (
        torch.randn(1, kv_heads, tokens, dim, generator=g, device="cuda").bfloat16().requires_grad_()
        for _ in range(2)
    )
    sinks = torch.randn(heads, generator=g, device="cuda").requires_grad_()
    grad = torch.randn(1, heads, tokens, dim, generator=g, device="cuda").bfloat16()
    return query, key, value, sinks, grad
