"""`gptoss-tune bench`: build random weights once, run each recipe on them, measure, compare.

For each recipe: set up (adapters, kernels, optimizer), compute the per-token losses of the shared
batch (adapters fresh, so every recipe computes the same function), then train `warmup` untimed and
`steps` timed steps. Reported per recipe: real (non-padding) tokens/s over the timed steps, MFU
(see `bench.flops`), peak GPU memory over the training steps (weights included), the first step's
loss (on the shared batch), and how far its per-token losses on the shared batch are from the
reference recipe's (cookbook when it ran: the most literal implementation). A recipe that runs out
of memory or fails is recorded as such and the others still run.

`expert_storage` "bf16" (default) builds transformers' GptOssForCausalLM with dense random weights,
which every recipe shares. "mxfp4" builds only our model, with random MXFP4 experts kept quantized
(`gptoss_tune.bench.weights`; the dense experts of 20b would take 39 GiB and 120b's do not fit one
GPU), so only ours / ours-eager can run.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch
from transformers import GptOssConfig

from gptoss_tune.bench.data import PACK_MULTIPLE, BenchData, bench_data, long_sequence, pad_examples
from gptoss_tune.bench.flops import FlopModel, mfu, peak_tflops_for
from gptoss_tune.bench.recipes import (
    OUR_RECIPES,
    RECIPES,
    Recipe,
    RecipeOptions,
    StepBatch,
    as_step,
    build_transformers_model,
    make_recipe,
)
from gptoss_tune.bench.weights import (
    BENCH_EXPERT_STORAGES,
    model_from_state_dict,
    random_model,
    shared_copy,
    weight_bytes,
)
from gptoss_tune.config import SHARDINGS
from gptoss_tune.devices import pick_device, pick_dtype
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.kernels import ATTENTION_BACKENDS, EXPERT_GEMMS, RECOMPUTE_POLICIES, FastPaths
from gptoss_tune.model.gpt_oss import GptOss
from gptoss_tune.model.lora import LoraOptions
from gptoss_tune.model.presets import preset_config

GIB = 1024**3
# Mean |per-token loss difference| above this is a disagreement, not bf16 noise. Measured on an H200
# (20b shape, random weights): the two transformers recipes, same weights, differ by 0.149.
LOSS_GAP_TOLERANCE = 0.25


GPU_TOKENS_PER_BATCH = 16384  # the micro-batch
CPU_TOKENS_PER_BATCH = 2048  # the eager-attention recipes' [T, T] scores of 4k-token rows fit a laptop


@dataclass(frozen=True)
class BenchOptions:
    preset: str = "20b"
    layers: int | None = None
    tokens_per_batch: int | None = None  # None: GPU_TOKENS_PER_BATCH on a GPU, CPU_TOKENS_PER_BATCH else
    steps: int = 6
    warmup: int = 2
    recipes: tuple[str, ...] = ("ours", "stock", "cookbook")
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "attn,experts"
    compile: bool = True
    memory_budget_gib: float | None = 60.0
    recompute: str = "layers"  # ours under the budget: layers, or auto (also the experts' gate_up alone)
    loss_chunk_tokens: int = 2048
    stock_checkpointing: bool = True
    attention: str = "auto"  # ours' attention: auto, flash or flex
    expert_gemm: str = "auto"  # ours' expert GEMMs: auto, quack, quack-fused or torch
    peak_tflops: float | None = None
    long_context: tuple[int, ...] = ()
    seed: int = 0
    device: str = "auto"
    expert_storage: str = "bf16"  # or "mxfp4": random MXFP4 experts kept quantized, ours only
    sharding: str = "ddp"  # --gpus runs: ddp, or fsdp (FSDP2) for models that do not fit one GPU

    def validate(self) -> BenchOptions:
        unknown = [name for name in self.recipes if name not in RECIPES]
        if unknown or not self.recipes:
            raise GptossTuneError(f"Unknown --recipes {unknown}; choose from {', '.join(RECIPES)}.")
        if self.expert_storage not in BENCH_EXPERT_STORAGES:
            raise GptossTuneError(
                f"Unknown --expert-storage '{self.expert_storage}'; choose from {', '.join(BENCH_EXPERT_STORAGES)}."
            )
        transformers_recipes = [name for name in self.recipes if name not in OUR_RECIPES]
        if self.expert_storage == "mxfp4" and transformers_recipes:
            raise GptossTuneError(
                f"--expert-storage mxfp4 runs only {' and '.join(OUR_RECIPES)}: the transformers recipes "
                f"({', '.join(transformers_recipes)}) need dense bf16 experts. Pass --recipes ours[,ours-eager], "
                "or --expert-storage bf16."
            )
        if self.sharding not in SHARDINGS:
            raise GptossTuneError(f"Unknown --sharding '{self.sharding}'; choose ddp or fsdp.")
        if self.attention not in ATTENTION_BACKENDS:
            raise GptossTuneError(
                f"Unknown --attention '{self.attention}'; choose {', '.join(ATTENTION_BACKENDS)}."
            )
        if self.expert_gemm not in EXPERT_GEMMS:
            raise GptossTuneError(
                f"Unknown --expert-gemm '{self.expert_gemm}'; choose {', '.join(EXPERT_GEMMS)}."
            )
        if self.recompute not in RECOMPUTE_POLICIES:
            raise GptossTuneError(
                f"Unknown --recompute '{self.recompute}'; choose {', '.join(RECOMPUTE_POLICIES)}."
            )
        too_few_tokens = self.tokens_per_batch is not None and self.tokens_per_batch < 1
        if self.steps < 1 or self.warmup < 0 or too_few_tokens:
            raise GptossTuneError("--steps and --tokens-per-batch must be positive, --warmup at least 0.")
        if self.layers is not None and self.layers < 1:
            raise GptossTuneError("--layers must be at least 1.")
        if any(length < 1 or length % PACK_MULTIPLE for length in self.long_context):
            raise GptossTuneError(f"--long-context lengths must be positive multiples of {PACK_MULTIPLE}.")
        return self

    def for_device(self, device: torch.device) -> BenchOptions:
        """With the micro-batch size filled in for `device` if it was left to the default."""
        if self.tokens_per_batch is not None:
            return self
        default = GPU_TOKENS_PER_BATCH if device.type == "cuda" else CPU_TOKENS_PER_BATCH
        return replace(self, tokens_per_batch=default)

    def lora(self) -> LoraOptions:
        return LoraOptions.from_strings(rank=self.lora_rank, alpha=self.lora_alpha, targets=self.lora_targets)


@dataclass
class RecipeResult:
    recipe: str
    description: str
    status: str = "ok"  # ok, OOM, or "error: ..."
    length: int | None = None  # long-context mode: the sequence length
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    first_loss: float | None = None
    shared_loss: float | None = None  # mean per-token loss on the shared batch
    loss_gap: float | None = None  # mean |per-token loss - reference's| on the shared batch
    timed_steps: int = 0
    timed_tokens: int = 0
    seconds: float = 0.0
    padding_fraction: float | None = None
    notes: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class BenchReport:
    meta: dict
    results: list[RecipeResult]
    components: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------


def bench_config(preset: str, layers: int | None) -> GptOssConfig:
    """The preset's architecture, cut to `layers` decoder layers when given."""
    config = preset_config(preset)
    if layers is not None and layers < config.num_hidden_layers:
        config.num_hidden_layers = layers
        config.layer_types = config.layer_types[:layers]
    return config


OPTIONAL_KERNEL_PACKAGES = ("flash-attn-4", "quack-kernels", "nvidia-cutlass-dsl")


def installed_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """{package: version} of those installed."""
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "kernel_packages": installed_versions(OPTIONAL_KERNEL_PACKAGES),
    }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GIB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# Measuring one recipe
# ---------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """Counters of the timed steps."""

    tokens: int = 0
    processed: int = 0
    flops: int = 0
    steps: int = 0
    seconds: float = 0.0


def with_shape_warmup(planned: list[StepBatch], warmup: int) -> tuple[list[StepBatch], int]:
    """The steps to run and how many come before the timed ones: after the `warmup` steps, one
    more untimed step on the first batch of each shape the timed steps will see and the warm-up did
    not (padded recipes change shape from batch to batch, and transformers' compiled attention
    recompiles for a new one; a long run pays that once, a few timed steps would pay it every step).
    Without warm-up steps nothing is added: the first step stays the shared batch."""
    if warmup == 0:
        return planned, 0
    seen = {tuple(b.payload.input_ids.shape) for b in planned[:warmup]}
    extra = []
    for batch in planned[warmup:]:
        shape = tuple(batch.payload.input_ids.shape)
        if shape not in seen:
            seen.add(shape)
            extra.append(batch)
    return planned[:warmup] + extra + planned[warmup:], warmup + len(extra)


def train_steps(
    recipe: Recipe,
    batches: Iterator[StepBatch],
    warmup: int,
    steps: int,
    flop_model: FlopModel,
    result: RecipeResult,
    log: Callable[[str], None],
) -> Measurement:
    measured = Measurement()
    planned, untimed = with_shape_warmup([next(batches) for _ in range(warmup + steps)], warmup)
    if untimed > warmup:
        result.notes["shape_warmup_steps"] = untimed - warmup
    started = 0.0
    for step, batch in enumerate(planned):
        if step == untimed:
            synchronize(recipe.device)
            started = time.perf_counter()
        step_started = time.perf_counter()
        loss = recipe.train_step(batch)
        loss_value = float(loss)  # waits for the step: the wall time below is the step's own
        if step == 0:
            result.first_loss = loss_value
        if step >= untimed:
            measured.tokens += batch.num_tokens
            measured.processed += batch.processed_tokens
            measured.flops += flop_model.training_flops(batch.document_lengths)
            measured.steps += 1
        kind = "timed" if step >= untimed else "untimed"
        log(
            f"  {recipe.name} step {step + 1}/{len(planned)} ({kind}): loss {loss_value:.4f}, "
            f"{batch.num_tokens} tokens, {1e3 * (time.perf_counter() - step_started):.1f} ms"
        )
    synchronize(recipe.device)
    measured.seconds = time.perf_counter() - started
    return measured


def fill_speed(result: RecipeResult, measured: Measurement, peak_tflops: float | None) -> None:
    result.timed_steps, result.timed_tokens, result.seconds = (
        measured.steps,
        measured.tokens,
        measured.seconds,
    )
    result.tokens_per_s = measured.tokens / measured.seconds if measured.seconds > 0 else None
    result.mfu = mfu(measured.flops, measured.seconds, peak_tflops)
    result.padding_fraction = 1 - measured.tokens / measured.processed if measured.processed else None


def run_guarded(result: RecipeResult, body: Callable[[], None], log: Callable[[str], None]) -> None:
    """Run `body`; an out-of-memory or any other failure is recorded on the result, not raised."""
    try:
        body()
    except torch.OutOfMemoryError:
        result.status = "OOM"
        log(f"  {result.recipe}: out of memory")
    except Exception as exc:  # a failing recipe must not stop the others
        result.status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        log(f"  {result.recipe} failed:\n{traceback.format_exc()}")


def measure_recipe(
    recipe: Recipe,
    batches: Callable[[], Iterator[StepBatch]],
    shared_examples: list | None,
    warmup: int,
    steps: int,
    flop_model: FlopModel,
    peak_tflops: float | None,
    log: Callable[[str], None],
    length: int | None = None,
) -> tuple[RecipeResult, torch.Tensor | None]:
    """Set up, (optionally) score the shared batch, train, tear down. Returns (result, token losses)."""
    result = RecipeResult(recipe.name, recipe.description, length=length)
    losses: list[torch.Tensor] = []

    def body() -> None:
        log(f"{recipe.name}: setting up" + (f" (length {length})" if length else ""))
        recipe.setup()
        if shared_examples is not None:
            losses.append(recipe.shared_token_losses(shared_examples))
            result.shared_loss = float(losses[0].mean()) if losses[0].numel() else None
        reset_peak(recipe.device)
        measured = train_steps(recipe, batches(), warmup, steps, flop_model, result, log)
        result.peak_gib = peak_gib(recipe.device)
        fill_speed(result, measured, peak_tflops)

    run_guarded(result, body, log)
    result.notes.update(recipe.notes)
    if not result.ok and result.peak_gib is None:
        result.peak_gib = peak_gib(recipe.device)
    recipe.teardown()
    release_memory(recipe.device)
    return result, losses[0] if losses else None


def compare_token_losses(results: list[RecipeResult], losses: dict[str, torch.Tensor]) -> str | None:
    """Set each result's loss_gap against the reference recipe's per-token losses; returns its name."""
    reference = next((name for name in ("cookbook", "stock", "ours-eager", "ours") if name in losses), None)
    if reference is None:
        return None
    expected = losses[reference]
    for result in results:
        mine = losses.get(result.recipe)
        if mine is not None and mine.shape == expected.shape and mine.numel():
            result.loss_gap = float((mine - expected).abs().mean())
    return reference


# ---------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------


class Bench:
    """Holds the shared weights and the compiled kernels across the recipes of one run.

    `on_update(report)` is called after every measured recipe, so a run cut short (a time limit)
    still leaves the results it has.
    """

    def __init__(
        self,
        options: BenchOptions,
        log: Callable[[str], None] = print,
        on_update: Callable[[BenchReport], None] | None = None,
    ) -> None:
        self.device = pick_device(options.device)
        self.options = options = options.validate().for_device(self.device)
        self.log = log
        self.on_update = on_update or (lambda report: None)
        self.report = BenchReport({}, [])
        self.dtype = pick_dtype("auto", self.device)
        self.config = bench_config(options.preset, options.layers)
        self.flop_model = FlopModel(self.config, options.lora_rank, options.lora().target_names())
        self.peak_tflops = options.peak_tflops or (
            peak_tflops_for(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        )
        self.kernels: FastPaths | None = None
        self.hf_model = None  # expert_storage bf16: transformers' model, the shared weights
        self.base_model: GptOss | None = None  # expert_storage mxfp4: our model, MXFP4 experts

    def recipe_options(self, row_length: int) -> RecipeOptions:
        budget = self.options.memory_budget_gib
        return RecipeOptions(
            lora=self.options.lora(),
            row_length=row_length,
            compile=self.options.compile,
            memory_budget_bytes=int(budget * GIB) if budget is not None else None,
            recompute=self.options.recompute,
            loss_chunk_tokens=self.options.loss_chunk_tokens,
            stock_checkpointing=self.options.stock_checkpointing,
            attention=self.options.attention,
            expert_gemm=self.options.expert_gemm,
        )

    def build_weights(self) -> None:
        storage = self.options.expert_storage
        self.log(
            f"building random {self.options.preset} weights ({self.config.num_hidden_layers} layers, "
            f"{storage} experts) on {self.device}"
        )
        started = time.perf_counter()
        if storage == "mxfp4":
            # Same initialization as build_transformers_model (lm_head at std 1/sqrt(hidden)).
            self.base_model = random_model(
                self.config,
                self.device,
                self.dtype,
                storage="mxfp4",
                seed=self.options.seed,
                lm_head_std=self.config.hidden_size**-0.5,
                scale_spread=1,
            )
        else:
            self.hf_model = build_transformers_model(self.config, self.device, self.dtype, self.options.seed)
        synchronize(self.device)
        self.log(f"weights ready in {time.perf_counter() - started:.1f} s ({self.weights_gib():.2f} GiB)")

    def weights_gib(self) -> float:
        return weight_bytes(self.base_model if self.base_model is not None else self.hf_model) / GIB

    def new_model(self) -> GptOss:
        """A fresh GptOss over the shared weights (no copy): what ours' recipes train."""
        if self.base_model is not None:
            return shared_copy(self.base_model)
        return model_from_state_dict(self.config, self.hf_model.state_dict())

    def make(self, name: str, row_length: int) -> Recipe:
        options = self.recipe_options(row_length)
        return make_recipe(
            name,
            options,
            self.device,
            model_factory=self.new_model,
            hf_model=self.hf_model,
            kernels=self.kernels,
        )

    def remember_kernels(self, recipe: Recipe) -> None:
        kernels = getattr(recipe, "kernels", None)
        if kernels is not None:
            self.kernels = kernels

    def add_result(self, result: RecipeResult) -> None:
        self.report.results.append(result)
        self.on_update(self.report)

    def run_throughput(self, data: BenchData) -> None:
        losses: dict[str, torch.Tensor] = {}
        for name in self.options.recipes:
            # Ours plans its checkpointing (and warms its kernels up) at the length of its rows.
            recipe = self.make(name, data.row_length)
            result, token_losses = measure_recipe(
                recipe,
                lambda recipe=recipe, data=data: recipe.batches(data),
                data.shared,
                self.options.warmup,
                self.options.steps,
                self.flop_model,
                self.peak_tflops,
                self.log,
            )
            self.remember_kernels(recipe)
            if token_losses is not None:
                losses[name] = token_losses
            self.report.meta["loss_reference"] = compare_token_losses(self.report.results + [result], losses)
            self.add_result(result)

    def run_long_context(self, data: BenchData) -> None:
        examples = data.shared + data.rest
        for name in self.options.recipes:
            for length in sorted(self.options.long_context):
                sequence = long_sequence(examples, length)
                if name in ("stock", "cookbook"):  # the same tokens as a padded batch of one row
                    row = (sequence.input_ids[0].tolist(), sequence.labels[0].tolist())
                    batch = as_step(pad_examples([row]))
                else:
                    batch = as_step(sequence)
                recipe = self.make(name, length)
                result, _ = measure_recipe(
                    recipe,
                    lambda batch=batch: _repeat(batch),
                    None,
                    min(self.options.warmup, 1),
                    self.options.steps,
                    self.flop_model,
                    self.peak_tflops,
                    self.log,
                    length=length,
                )
                self.remember_kernels(recipe)
                self.add_result(result)
                if not result.ok:
                    break  # longer sequences will not fit either

    def run(self) -> BenchReport:
        self.build_weights()
        meta = environment(self.device) | {
            "preset": self.options.preset,
            "layers": self.config.num_hidden_layers,
            "tokens_per_batch": self.options.tokens_per_batch,
            "steps": self.options.steps,
            "warmup": self.options.warmup,
            "lora": f"r={self.options.lora_rank}, alpha={self.options.lora_alpha:g}, "
            f"targets={','.join(self.options.lora().target_names())}",
            "memory_budget_gib": self.options.memory_budget_gib,
            "recompute": self.options.recompute,
            "weights_gib": round(self.weights_gib(), 2),
            "dtype": str(self.dtype).removeprefix("torch."),
            "expert_storage": self.options.expert_storage,
            "peak_tflops": self.peak_tflops,
            "active_matmul_params": self.flop_model.matmul_parameters,
        }
        steps = self.options.warmup + self.options.steps
        data = bench_data(self.options.tokens_per_batch, steps, self.options.seed)
        meta["shared_batch_examples"] = len(data.shared)
        self.report = BenchReport(meta, [])
        if self.options.long_context:
            meta["long_context"] = list(self.options.long_context)
            meta["warmup"] = min(self.options.warmup, 1)
            self.run_long_context(data)
        else:
            self.run_throughput(data)
        return self.report

    def time_components(self, profile_path: Path | None = None) -> list[dict]:
        """Per-component timings (CUDA; after `run`, which builds the weights and the kernels), and
        with `profile_path` the experts' kernel table written there."""
        if self.device.type != "cuda" or (self.hf_model is None and self.base_model is None):
            return []
        from gptoss_tune.bench.components import time_components

        return time_components(self, profile_path)


def _repeat(batch: StepBatch) -> Iterator[StepBatch]:
    while True:
        yield batch


def with_defaults_for_long_context(options: BenchOptions, recipes_given: bool) -> BenchOptions:
    """Long-context runs, and runs with MXFP4 expert storage, measure ours unless recipes were asked
    for explicitly."""
    if (options.long_context or options.expert_storage == "mxfp4") and not recipes_given:
        return replace(options, recipes=("ours",))
    return options
