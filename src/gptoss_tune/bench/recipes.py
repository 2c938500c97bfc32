"""The recipes `gptoss-tune bench` compares, all on the same random weights (one copy in memory).

- cookbook: OpenAI's cookbook recipe: transformers GptOssForCausalLM with eager attention and eager
  experts, PEFT LoRA, padded batches of whole examples, gradient checkpointing.
- stock: the best stock transformers setup: flex_attention (eager on a CPU, where transformers'
  flex_attention cannot run sinks) + grouped_mm experts, PEFT LoRA, padded batches, gradient
  checkpointing.
- ours: our model sharing the same tensors, packed micro-batches, our kernels
  (`gptoss_tune.kernels`), selective activation checkpointing under a memory budget.
- ours-eager: our model with its eager reference kernels and every layer checkpointed (separates
  the gain of packing from the gain of the kernels).

With `--expert-storage mxfp4` there is no transformers model: the shared weights are our own model
with MXFP4 experts (`gptoss_tune.bench.weights`), and only ours / ours-eager run.

Every recipe trains the same LoRA targets at the same rank with fused AdamW, bf16 autocast and fp32
adapters, clips the gradient norm at 1.0, and can report its final hidden states on the shared
batch (a forward with gradients enabled, as in training, so no extra inference graph is compiled).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import GptOssConfig

from gptoss_tune.bench.data import BenchData, Example, PaddedBatch, pad_examples
from gptoss_tune.data.pack import MicroBatch, collate
from gptoss_tune.harmony import tokens as T
from gptoss_tune.kernels import (
    FastPaths,
    RecomputePlan,
    compile_mxfp4_dequantization,
    enable_fast_paths,
    plan_activation_checkpointing,
)
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.lora import (
    ATTENTION_TARGETS,
    EXPERT_TARGETS,
    LoraOptions,
    adapters_to_fp32,
    apply_lora,
)

# A fresh GptOss over the shared base weights (no copy), frozen, without adapters or kernels.
ModelFactory = Callable[[], GptOss]

RECIPES = ("ours", "ours-eager", "stock", "cookbook")
OUR_RECIPES = ("ours", "ours-eager")
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class RecipeOptions:
    lora: LoraOptions
    row_length: int  # ours: the length of its packed rows (the checkpointing plan measures it)
    compile: bool = True
    memory_budget_bytes: int | None = None  # ours: selective checkpointing budget (None: none)
    recompute: str = "layers"  # ours under the budget: layers, or auto (also the experts' gate_up alone)
    loss_chunk_tokens: int = 2048
    stock_checkpointing: bool = True
    attention: str = "auto"  # ours: auto, flash or flex (gptoss_tune.kernels.make_attention)
    expert_gemm: str = "auto"  # ours: auto, quack, quack-fused or torch (gptoss_tune.kernels.ExpertGemm)


@dataclass(frozen=True)
class StepBatch:
    """One micro-batch as a recipe consumes it, with what the metrics need."""

    payload: MicroBatch | PaddedBatch
    document_lengths: tuple[int, ...]  # real (non-padding) documents
    processed_tokens: int  # real + padding

    @property
    def num_tokens(self) -> int:
        return sum(self.document_lengths)


def packed_document_lengths(batch: MicroBatch) -> tuple[int, ...]:
    """Lengths of the real documents of a packed row (positions restart at each one)."""
    positions = batch.position_ids[0, : batch.num_tokens].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return tuple(b - a for a, b in zip(starts, starts[1:], strict=False))


def as_step(batch: MicroBatch | PaddedBatch) -> StepBatch:
    if isinstance(batch, PaddedBatch):
        return StepBatch(batch, batch.lengths, batch.input_ids.numel())
    return StepBatch(batch, packed_document_lengths(batch), batch.input_ids.numel())


# ---------------------------------------------------------------------------------------------------
# Shared-batch targets (for comparing per-token losses across recipes)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SharedTargets:
    """Every trained next-token target of the shared examples, in example then position order."""

    rows: Tensor  # [M] example index (row of the padded batch)
    columns: Tensor  # [M] position of the predicting token within its example
    packed: Tensor  # [M] position of the predicting token within the packed row
    targets: Tensor  # [M] target token id


def shared_targets(examples: Sequence[Example]) -> SharedTargets:
    rows, columns, packed, targets = [], [], [], []
    offset = 0
    for row, (ids, labels) in enumerate(examples):
        for column in range(len(ids) - 1):
            if labels[column + 1] != T.IGNORE_INDEX:
                rows.append(row)
                columns.append(column)
                packed.append(offset + column)
                targets.append(labels[column + 1])
        offset += len(ids)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return SharedTargets(as_tensor(rows), as_tensor(columns), as_tensor(packed), as_tensor(targets))


def token_losses(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """Per-token cross-entropy in fp32 (hidden [M, H], weight [V, H]) -> [M] on the CPU."""
    losses = []
    with torch.no_grad():
        weight = weight.float()
        for start in range(0, targets.numel(), chunk):
            logits = hidden[start : start + chunk].float() @ weight.t()
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits, targets[start : start + chunk].to(logits.device), reduction="none"
                ).cpu()
            )
    return torch.cat(losses) if losses else torch.zeros(0)


# ---------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Recipe(ABC):
    name: str
    description: str

    def __init__(self, options: RecipeOptions, device: torch.device) -> None:
        self.options = options
        self.device = device
        self.optimizer: torch.optim.Optimizer | None = None
        self.params: list[nn.Parameter] = []
        self.notes: dict[str, object] = {}

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def batches(self, data: BenchData) -> Iterator[StepBatch]: ...

    @abstractmethod
    def loss(self, batch: StepBatch) -> Tensor:
        """The mean loss over the batch's trained tokens (with gradients)."""

    @abstractmethod
    def shared_hidden(self, examples: Sequence[Example], targets: SharedTargets) -> Tensor:
        """Final hidden states [M, H] at the shared targets' predicting positions (detached)."""

    @abstractmethod
    def lm_head_weight(self) -> Tensor: ...

    @abstractmethod
    def teardown(self) -> None: ...

    def make_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE, fused=self.device.type == "cuda")

    def train_step(self, batch: StepBatch) -> Tensor:
        with autocast(self.device):
            loss = self.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def shared_token_losses(self, examples: Sequence[Example]) -> Tensor:
        targets = shared_targets(examples)
        hidden = self.shared_hidden(examples, targets)
        return token_losses(hidden, self.lm_head_weight(), targets.targets)


class OursRecipe(Recipe):
    """Our model on the shared tensors, packed micro-batches, fast or eager kernels.

    `model_factory()` returns a fresh frozen GptOss over the shared base weights (dense or MXFP4
    experts); the recipe attaches its adapters and kernels to it and drops it at teardown.
    """

    def __init__(
        self,
        options: RecipeOptions,
        device: torch.device,
        model_factory: ModelFactory,
        fast: bool,
        kernels: FastPaths | None = None,
    ) -> None:
        super().__init__(options, device)
        self.model_factory, self.fast = model_factory, fast
        self.kernels = kernels
        self.name = "ours" if fast else "ours-eager"
        self.description = (
            "ours: packed, flash/flex attention + grouped experts + fused loss, selective checkpointing"
            if fast
            else "ours, eager kernels: packed, every layer checkpointed"
        )
        self.model: GptOss | None = None

    def setup(self) -> None:
        model = self.model_factory()  # shares the tensors: no second copy
        params = adapters_to_fp32(apply_lora(model, self.options.lora))
        self.model, self.params = model, list(params.values())
        if self.fast:
            self._enable_kernels(model)
        else:
            model.set_gradient_checkpointing(True)
        plan = RecomputePlan.of(model)
        checkpointed, gate_up = len(plan.checkpointed), len(plan.gate_up)
        self.notes["checkpointed_layers"] = f"{checkpointed} + {gate_up} gate_up" if gate_up else checkpointed
        self.make_optimizer()

    def _enable_kernels(self, model: GptOss) -> None:
        if self.kernels is None:
            self.kernels = enable_fast_paths(
                model,
                compile=self.options.compile,
                loss_chunk_tokens=self.options.loss_chunk_tokens,
                attention_backend=self.options.attention,
                expert_gemm=self.options.expert_gemm,
            )
        else:  # reuse the compiled kernels of an earlier setup
            self.kernels.install(model)
        self.notes["kernels"] = self.kernels.describe()
        if self.options.compile and compile_mxfp4_dequantization(model):
            self.notes["dequantize"] = "compiled"
        budget = self.options.memory_budget_bytes
        if self.device.type == "cuda" and budget is not None:
            plan = plan_activation_checkpointing(
                model, self.options.row_length, budget, policy=self.options.recompute
            )
            layers = len(model.model.layers)
            self.notes["memory_plan"] = f"{plan.describe(layers)}; {plan.measured.describe()}"
        else:
            model.set_gradient_checkpointing(budget is not None)

    def batches(self, data: BenchData) -> Iterator[StepBatch]:
        return (as_step(batch) for batch in data.packed())

    def loss(self, batch: StepBatch) -> Tensor:
        micro = batch.payload.to(self.device)
        total, count = self.model.loss(micro.input_ids, micro.labels, micro.position_ids)
        return total / count.clamp_min(1)

    def shared_hidden(self, examples: Sequence[Example], targets: SharedTargets) -> Tensor:
        # Padded like the training rows, so the kernels compiled for training take it as is.
        micro = collate(list(examples), self.options.row_length).to(self.device)
        with torch.enable_grad(), autocast(self.device):
            hidden = self.model.hidden_states(micro.input_ids, micro.position_ids)
        return hidden[0].detach().index_select(0, targets.packed.to(self.device))

    def lm_head_weight(self) -> Tensor:
        return self.model.lm_head.weight

    def teardown(self) -> None:
        self.model = self.optimizer = None
        self.params = []


class TransformersRecipe(Recipe):
    """transformers GptOssForCausalLM + PEFT LoRA on padded batches."""

    def __init__(
        self,
        options: RecipeOptions,
        device: torch.device,
        model: nn.Module,
        name: str,
        attn_implementation: str,
        experts_implementation: str,
    ) -> None:
        super().__init__(options, device)
        self.hf = model
        self.name = name
        self.attn_implementation, self.experts_implementation = attn_implementation, experts_implementation
        checkpointing = "gradient checkpointing" if self.checkpointing else "no checkpointing"
        self.description = (
            f"{name}: transformers attn={attn_implementation}, experts={experts_implementation}, "
            f"PEFT, padded, {checkpointing}"
        )
        self.peft_model: nn.Module | None = None

    @property
    def checkpointing(self) -> bool:
        return self.name == "cookbook" or self.options.stock_checkpointing

    def peft_config(self):
        from peft import LoraConfig

        names = self.options.lora.target_names()
        attention = [name for name in names if name in ATTENTION_TARGETS]
        experts = [f"mlp.experts.{name}" for name in names if name in EXPERT_TARGETS]
        return LoraConfig(
            r=self.options.lora.rank,
            lora_alpha=self.options.lora.alpha,
            lora_dropout=0.0,
            target_modules=attention or None,
            target_parameters=experts or None,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def setup(self) -> None:
        from peft import get_peft_model

        self.hf.set_attn_implementation(self.attn_implementation)
        self.hf.set_experts_implementation(self.experts_implementation)
        self.hf.config.use_cache = False
        if self.checkpointing:
            set_transformers_checkpointing(self.hf, True)
        self.peft_model = get_peft_model(self.hf, self.peft_config())
        self.peft_model.train()
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.notes["checkpointed_layers"] = self.hf.config.num_hidden_layers if self.checkpointing else 0
        self.make_optimizer()

    def batches(self, data: BenchData) -> Iterator[StepBatch]:
        return (as_step(batch) for batch in data.padded())

    def loss(self, batch: StepBatch) -> Tensor:
        padded = batch.payload.to(self.device)
        output = self.peft_model(
            input_ids=padded.input_ids,
            attention_mask=padded.attention_mask,
            labels=padded.labels,
            use_cache=False,
        )
        return output.loss

    def shared_hidden(self, examples: Sequence[Example], targets: SharedTargets) -> Tensor:
        padded = pad_examples(examples).to(self.device)
        with torch.enable_grad(), autocast(self.device):
            output = self.hf.model(
                input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False
            )
        hidden = output.last_hidden_state.detach()
        return hidden[targets.rows.to(self.device), targets.columns.to(self.device)]

    def lm_head_weight(self) -> Tensor:
        return self.hf.lm_head.weight

    def teardown(self) -> None:
        if self.peft_model is not None:
            self.peft_model.unload()  # removes the adapters; the base tensors stay as they were
        if self.checkpointing:
            set_transformers_checkpointing(self.hf, False)
        self.peft_model = self.optimizer = None
        self.params = []


def set_transformers_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Activation checkpointing of every layer (non-reentrant), under transformers' current name for it
    (`activation_checkpointing_*` since 5.2x, `gradient_checkpointing_*` before)."""
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def build_transformers_model(
    config: GptOssConfig, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> nn.Module:
    """transformers GptOssForCausalLM with random weights, allocated and initialized on `device`.

    transformers' initialization, except lm_head at std 1/sqrt(hidden): logits of unit scale, so the
    per-token losses depend on the hidden states enough to tell implementations apart (with std 0.02
    a small model's logits are flat and every recipe scores ln(vocab) whatever it computes). Drawn
    from torch's global generators seeded with `seed` (restored afterwards), so two runs with the
    same seed train the same model and route tokens alike: their speeds compare.
    """
    from transformers import GptOssForCausalLM

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.device(device):
            model = GptOssForCausalLM._from_config(
                config, attn_implementation="eager", experts_implementation="eager", dtype=dtype
            )
        model.requires_grad_(False)
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, config.hidden_size**-0.5)
    return model


def stock_attention(device: torch.device) -> str:
    """flex_attention, the fastest transformers attention with sinks; on a CPU, where transformers'
    flex_attention refuses sinks, eager attention."""
    return "flex_attention" if device.type == "cuda" else "eager"


def make_recipe(
    name: str,
    options: RecipeOptions,
    device: torch.device,
    model_factory: ModelFactory | None = None,
    hf_model: nn.Module | None = None,
    kernels: FastPaths | None = None,
) -> Recipe:
    """Recipe `name`: ours / ours-eager need `model_factory`, stock / cookbook `hf_model`."""
    if name in OUR_RECIPES:
        if model_factory is None:
            raise ValueError(f"recipe {name!r} needs a model factory")
        return OursRecipe(options, device, model_factory, fast=name == "ours", kernels=kernels)
    if name in ("stock", "cookbook") and hf_model is None:
        raise ValueError(
            f"recipe {name!r} needs the transformers model (not built with MXFP4 expert storage)"
        )
    if name == "stock":
        return TransformersRecipe(options, device, hf_model, "stock", stock_attention(device), "grouped_mm")
    if name == "cookbook":
        return TransformersRecipe(options, device, hf_model, "cookbook", "eager", "eager")
    raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
