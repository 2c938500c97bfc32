"""Selective recomputation: recompute only what the memory budget needs, where it costs least.

First, the cheapest: the fast paths keep the norms' inputs instead of their outputs and normalize
again in backward (`NormSource`: two memory-bound passes per layer, two [N, H] tensors fewer). Every
layer does so unless everything fits without it (`LayerMemory.norms_saved`). Then each decoder layer
keeps its activations for backward in one of three ways:

- it recomputes nothing more and keeps all of them (`LayerMemory.saved`);
- its experts keep no gate_up pre-activation and run the gate_up forward again in backward
  (`Experts.recompute_gate_up`; the largest tensor a layer keeps, for one grouped GEMM);
- it is checkpointed: it keeps only its input and runs its whole forward again in backward.

On the GPU, `measure_layer_memory` runs one real layer at the micro-batch's length each way and
measures what it keeps, its transient peak and what the recomputation adds to its time. Then
`choose_recompute_plan` takes the plan with the least added time whose peak fits:

    peak = fixed + max over layers i (backward runs from the last) of
           kept by layers below i + what layer i holds while its backward runs  <= budget

where fixed = now allocated + optimizer + the loss's measured peak (`measure_loss_memory`: the
installed loss function on `tokens` trained positions, so a loss that keeps less leaves more room
for activations). The first layers are the checkpointed ones, then the layers that recompute their
gate_up: all activations are alive when backward starts, so these hold their transients when the
rest has been freed.

Two approximations, of opposite sign, that roughly cancel (the measured peaks of full-depth runs
stayed under their budgets): a measured layer's `saved` leaves out its output, which the next
layer's norm keeps (one [N, H] tensor per layer that is not checkpointed), and `fixed` counts the
loss's whole transient peak, which is over before the layers' backward starts. Correcting either
alone moves the plan's fit to its budget; do both together, on a GPU.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from gptoss_tune.model.gpt_oss import GptOss, document_ids

GIB = 1024**3
ADAM_STATE_COPIES = 3  # gradient + two moments, fp32 like the adapters
AUTO_HEADROOM = 0.08  # of the GPU's memory, kept free by an "auto" budget (allocator slack, NCCL buffers)
RECOMPUTE_POLICIES = ("layers", "auto")  # whole layers only; or also the experts' gate_up alone


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one decoder layer keeps for backward and holds while it runs, at a given micro-batch
    length, each way it can keep its activations; and the seconds each recomputation adds."""

    saved: int  # kept for backward when the layer recomputes nothing
    checkpointed: int  # kept when it is checkpointed: its input
    transient: int  # held beyond `saved` while its backward runs
    gate_up_saved: int | None = None  # kept when its experts recompute their gate_up (None: not measured)
    gate_up_transient: int = 0  # held beyond `gate_up_saved` while such a layer's backward runs
    forward_seconds: float = 1.0  # what checkpointing the layer adds: one more forward
    gate_up_seconds: float = 0.0  # what recomputing the experts' gate_up adds to its backward
    norms_saved: int | None = None  # kept when it also keeps its norms' outputs (None: not measured)
    norms_seconds: float = 0.0  # what normalizing again adds to its backward

    @property
    def gate_up_helps(self) -> bool:
        return self.gate_up_saved is not None and self.gate_up_saved < self.saved

    def describe(self) -> str:
        text = f"a layer keeps {self.saved / GIB:.2f} GiB (checkpointed {self.checkpointed / GIB:.2f}"
        if self.norms_saved is not None:
            text += f"; keeping its norms' outputs {self.norms_saved / GIB:.2f}"
        text += ")"
        if self.gate_up_saved is not None:
            text += f", {self.gate_up_saved / GIB:.2f} with its gate_up recomputed"
        text += f"; recomputing it costs {1000 * self.forward_seconds:.1f} ms"
        if self.gate_up_saved is not None:
            text += f", its gate_up {1000 * self.gate_up_seconds:.1f} ms"
        if self.norms_saved is not None:
            text += f", its norms' outputs {1000 * self.norms_seconds:.2f} ms"
        return text


@dataclass(frozen=True)
class RecomputePlan:
    """Which layers recompute what in backward (layer indices, disjoint), and whether the layers
    keep their norms' outputs (only when everything fits so)."""

    checkpointed: tuple[int, ...] = ()
    gate_up: tuple[int, ...] = ()
    norms_kept: bool = False
    measured: LayerMemory | None = field(default=None, compare=False)  # what the plan was chosen from

    @classmethod
    def of(cls, model: GptOss) -> RecomputePlan:
        """The plan `model` runs now."""
        return cls(
            tuple(sorted(model.model.checkpointed_layers)),
            tuple(sorted(model.gate_up_recomputed_layers)),
            norms_kept=not model.norms_recomputed,
        )

    def apply(self, model: GptOss) -> None:
        model.set_gradient_checkpointing(
            self.checkpointed, recompute_gate_up=self.gate_up, recompute_norms=not self.norms_kept
        )

    def describe(self, num_layers: int) -> str:
        text = f"{len(self.checkpointed)} of {num_layers} layers recomputed"
        text += f", the experts' gate_up in {len(self.gate_up)} more" if self.gate_up else ""
        return text + ("" if self.norms_kept else "; norm outputs recomputed")


def _held_while_backward(layer: LayerMemory, way: str) -> int:
    """What a layer kept one `way` holds while its backward runs (a checkpointed layer first runs
    its forward again, keeping everything)."""
    if way == "checkpointed":
        return layer.checkpointed + layer.saved + layer.transient
    if way == "gate_up":
        return layer.gate_up_saved + layer.gate_up_transient
    return layer.saved + layer.transient


def _kept(layer: LayerMemory, way: str) -> int:
    """What a layer kept one `way` keeps from its forward until its backward."""
    if way == "checkpointed":
        return layer.checkpointed
    return layer.gate_up_saved if way == "gate_up" else layer.saved


def _ways(num_layers: int, plan: RecomputePlan) -> list[str]:
    ways = ["all"] * num_layers
    for index in plan.checkpointed:
        ways[index] = "checkpointed"
    for index in plan.gate_up:
        ways[index] = "gate_up"
    return ways


def plan_kept_bytes(num_layers: int, layer: LayerMemory, plan: RecomputePlan) -> int:
    """What the layers keep for backward under `plan`, all together."""
    return sum(_kept(layer, way) for way in _ways(num_layers, plan))


def plan_peak_bytes(num_layers: int, layer: LayerMemory, plan: RecomputePlan) -> int:
    """The activations' peak under `plan` (beyond the fixed memory): backward runs from the last
    layer down; while layer i runs it, layers below i still keep theirs."""
    below, peak = 0, 0
    for way in _ways(num_layers, plan):
        peak = max(peak, below + _held_while_backward(layer, way))
        below += _kept(layer, way)
    return peak


def plan_seconds(layer: LayerMemory, plan: RecomputePlan) -> float:
    """What `plan` adds to a step's time."""
    return len(plan.checkpointed) * layer.forward_seconds + len(plan.gate_up) * layer.gate_up_seconds


def choose_recompute_plan(
    num_layers: int, layer: LayerMemory, available: int, policy: str = "auto"
) -> RecomputePlan:
    """The plan with the least added time whose peak fits in `available` bytes (ties: fewer
    recomputed layers); when none fits, the one that keeps least (the caller reports the shortfall).
    policy "layers" checkpoints whole layers only; "auto" may also have layers recompute only their
    experts' gate_up. The layers keep their norms' outputs (faster by two memory-bound passes each)
    only if nothing needs recomputing then."""
    if layer.norms_saved is not None:
        keeping_norms = replace(layer, saved=layer.norms_saved)
        if plan_peak_bytes(num_layers, keeping_norms, RecomputePlan()) <= available:
            return RecomputePlan(norms_kept=True)
    gate_up_counts = num_layers + 1 if policy == "auto" and layer.gate_up_helps else 1
    plans = [
        RecomputePlan(tuple(range(checkpointed)), tuple(range(checkpointed, checkpointed + gate_up)))
        for checkpointed in range(num_layers + 1)
        for gate_up in range(min(gate_up_counts, num_layers - checkpointed + 1))
    ]
    peaks = {plan: plan_peak_bytes(num_layers, layer, plan) for plan in plans}
    fitting = [plan for plan in plans if peaks[plan] <= available]
    if not fitting:
        return min(
            plans, key=lambda plan: (plan_kept_bytes(num_layers, layer, plan), plan_seconds(layer, plan))
        )
    return min(
        fitting, key=lambda plan: (plan_seconds(layer, plan), len(plan.checkpointed), len(plan.gate_up))
    )


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


TIMED_RUNS = 3  # per way of keeping activations, after one warm-up run; the median counts


@dataclass(frozen=True)
class _LayerRun:
    saved: int  # bytes kept from forward to backward beyond the output
    peak: int  # peak bytes of forward + backward
    forward_seconds: float
    backward_seconds: float


def measure_layer_memory(
    model: GptOss, tokens: int, dtype: torch.dtype = torch.bfloat16, layer_index: int = 0
) -> LayerMemory:
    """Run one layer forward and backward on random input (CUDA), normalizing again in backward and
    keeping all its other activations, then with its experts recomputing their gate_up, and measure
    what it keeps, its transient peak and its times; then what it keeps with its norms' outputs kept
    too. Leaves no gradient behind and the layer's settings as they were. A first, unmeasured run
    each way warms up (compiles) the layer's kernels and settles their caches (e.g. a block mask
    replaced during the measured forward would otherwise count as negative memory)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError("measure_layer_memory needs the model on a CUDA device")
    layer = model.model.layers[layer_index]
    experts = layer.mlp.experts
    settings = experts.recompute_gate_up, layer.recompute_norms
    runs = {}
    try:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            hidden, cos, sin, documents = _random_layer_inputs(model, tokens, dtype, device)
            for way, gate_up, norms in (
                ("all", False, True),
                ("gate_up", True, True),
                ("norms", False, False),
            ):
                experts.recompute_gate_up, layer.recompute_norms = gate_up, norms
                _layer_forward_backward(layer, hidden, cos, sin, documents)  # warm-up
                runs[way] = _median_run(
                    [_layer_forward_backward(layer, hidden, cos, sin, documents) for _ in range(TIMED_RUNS)]
                )
    finally:
        experts.recompute_gate_up, layer.recompute_norms = settings
    keep_all, gate_up = runs["all"], runs["gate_up"]
    return LayerMemory(
        saved=max(keep_all.saved, 0),
        checkpointed=tokens * model.config.hidden_size * dtype.itemsize,
        transient=max(keep_all.peak - keep_all.saved, 0),
        gate_up_saved=max(gate_up.saved, 0),
        gate_up_transient=max(gate_up.peak - gate_up.saved, 0),
        forward_seconds=keep_all.forward_seconds,
        gate_up_seconds=max(gate_up.backward_seconds - keep_all.backward_seconds, 0.0),
        norms_saved=max(runs["norms"].saved, 0),
        norms_seconds=max(keep_all.backward_seconds - runs["norms"].backward_seconds, 0.0),
    )


def _median_run(runs: list[_LayerRun]) -> _LayerRun:
    """Memory of the last run (settled), the median of the times."""
    return _LayerRun(
        runs[-1].saved,
        runs[-1].peak,
        statistics.median(run.forward_seconds for run in runs),
        statistics.median(run.backward_seconds for run in runs),
    )


def _layer_forward_backward(
    layer: torch.nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, documents: Tensor
) -> _LayerRun:
    device = hidden.device
    started, forward_done, backward_done = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    before = _start_measuring(device)
    started.record()
    output: Tensor = layer(hidden, cos, sin, documents)
    forward_done.record()
    torch.cuda.synchronize(device)
    saved = torch.cuda.memory_allocated(device) - before - output.numel() * output.element_size()
    grad = torch.randn_like(output)
    torch.cuda.synchronize(device)
    backward_started = torch.cuda.Event(enable_timing=True)
    backward_started.record()
    output.backward(grad)
    backward_done.record()
    peak = _peak_since(device, before)
    hidden.grad = None
    for param in layer.parameters():
        param.grad = None
    return _LayerRun(
        saved,
        peak,
        started.elapsed_time(forward_done) / 1000,
        backward_started.elapsed_time(backward_done) / 1000,
    )


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
    policy: str = "layers",
) -> RecomputePlan:
    """Measure, choose and apply (on the model) the recomputation plan; see `choose_recompute_plan`
    for `policy`."""
    if policy not in RECOMPUTE_POLICIES:
        raise ValueError(f"Unknown recompute policy '{policy}': use {', '.join(RECOMPUTE_POLICIES)}.")
    device = next(model.parameters()).device
    layer = measure_layer_memory(model, tokens, dtype)
    optimizer = ADAM_STATE_COPIES * _lora_parameter_bytes(model)
    fixed = torch.cuda.memory_allocated(device) + optimizer + measure_loss_memory(model, tokens, dtype)
    plan = choose_recompute_plan(len(model.model.layers), layer, budget_bytes - fixed, policy)
    plan.apply(model)
    return replace(plan, measured=layer)
