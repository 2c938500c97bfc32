"""`gptoss-tune bench`: the FLOP model, the batches, failure handling, and a whole run on the CPU."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from gptoss_tune.bench.data import BenchData, bench_data, long_sequence, packed_batches, pad_examples
from gptoss_tune.bench.flops import (
    FlopModel,
    active_matmul_parameters,
    attention_flops,
    lora_parameters_per_token,
    mfu,
    peak_tflops_for,
    visible_pairs,
)
from gptoss_tune.bench.recipes import (
    StepBatch,
    as_step,
    build_transformers_model,
    packed_document_lengths,
    shared_targets,
)
from gptoss_tune.bench.report import describe_meta, loss_gap_tolerance, markdown, throughput_table
from gptoss_tune.bench.run import (
    LOSS_GAP_TOLERANCE,
    OPTIONAL_KERNEL_PACKAGES,
    Bench,
    BenchOptions,
    RecipeResult,
    compare_token_losses,
    installed_versions,
    run_guarded,
    with_defaults_for_long_context,
    with_shape_warmup,
)
from gptoss_tune.bench.weights import expert_storage_of, random_model, shared_copy
from gptoss_tune.cli import app
from gptoss_tune.data.pack import collate
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.model.gpt_oss import GptOss, attention_mask, document_ids
from gptoss_tune.model.lora import LoraOptions, apply_lora
from gptoss_tune.model.presets import preset_config

# ---------------------------------------------------------------------------------------------------
# FLOP model
# ---------------------------------------------------------------------------------------------------


def meta_model(preset: str) -> GptOss:
    with torch.device("meta"):
        return GptOss(preset_config(preset))


@pytest.mark.parametrize("preset", ["tiny", "20b", "120b"])
def test_active_matmul_parameters_count_what_one_token_multiplies(preset) -> None:
    model = meta_model(preset)
    config = model.config
    per_layer = 0
    layer = model.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        per_layer += getattr(layer.self_attn, name).weight.numel()
    per_layer += layer.mlp.router.weight.numel()
    experts = layer.mlp.experts
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // config.num_local_experts
    per_layer += config.num_experts_per_tok * per_expert
    expected = config.num_hidden_layers * per_layer + model.lm_head.weight.numel()
    assert active_matmul_parameters(config) == expected
    if preset == "20b":
        assert round(expected / 1e9, 2) == 3.61  # the published "3.6B active"


def test_lora_parameters_per_token_count_a_tokens_adapters() -> None:
    model = meta_model("tiny")
    config = model.config
    params = apply_lora(model, LoraOptions(rank=4))
    attention = sum(p.numel() for name, p in params.items() if "self_attn" in name)
    experts = sum(p.numel() for name, p in params.items() if "experts" in name)
    expected = attention + experts // config.num_local_experts * config.num_experts_per_tok
    names = LoraOptions().target_names()
    assert lora_parameters_per_token(config, 4, names) == expected


@pytest.mark.parametrize("length", [1, 5, 8, 9, 30])
@pytest.mark.parametrize("window", [None, 1, 8])
def test_visible_pairs_count_the_reference_mask(length, window) -> None:
    documents = torch.zeros(1, length, dtype=torch.long)
    assert visible_pairs(length, window) == int(attention_mask(documents, window).sum())


def test_attention_flops_follow_the_layer_types() -> None:
    config = preset_config("tiny")  # layer 0 sliding (window 8), layer 1 full
    lengths = [20, 3]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    documents = document_ids(positions)
    pairs = int(attention_mask(documents, 8).sum()) + int(attention_mask(documents, None).sum())
    per_pair = 4 * config.num_attention_heads * config.head_dim
    assert attention_flops(config, lengths) == 3 * per_pair * pairs


def test_training_flops_are_4n_plus_lora_plus_attention() -> None:
    config = preset_config("20b")
    model = FlopModel(config, 8, ("q_proj", "down_proj"))
    lora = lora_parameters_per_token(config, 8, ("q_proj", "down_proj"))
    expected = (
        4 * active_matmul_parameters(config) * 300 + 6 * lora * 300 + attention_flops(config, [100, 200])
    )
    assert model.training_flops([100, 200]) == expected
    assert mfu(989.4e12, 2.0, 989.4) == pytest.approx(0.5)
    assert mfu(1.0, 1.0, None) is None


def test_peak_tflops_come_from_the_device_name() -> None:
    assert peak_tflops_for("NVIDIA H200") == 989.4
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Some Future GPU") is None


# ---------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> BenchData:
    return bench_data(tokens_per_batch=4096, steps=3, seed=0)


def test_the_shared_batch_fits_one_padded_batch_and_one_packed_row(data) -> None:
    padded = next(data.padded())
    packed = next(data.packed())
    assert padded.input_ids.numel() <= 4096
    assert padded.lengths == tuple(len(ids) for ids, _ in data.shared)
    assert packed.num_tokens == padded.num_tokens
    assert packed.input_ids.shape[1] == data.row_length == 4096
    assert packed_document_lengths(packed) == padded.lengths


def test_packed_and_padded_streams_respect_the_token_budget(data) -> None:
    packed, padded = data.packed(), data.padded()
    for _ in range(6):
        micro = next(packed)
        assert micro.num_tokens <= 4096 and micro.input_ids.shape[1] == data.row_length
        batch = next(padded)
        assert batch.input_ids.numel() <= 4096 or batch.input_ids.shape[0] == 1
        assert int(batch.attention_mask.sum()) == batch.num_tokens


def test_packed_stream_leaves_out_bins_less_than_half_full_while_fuller_ones_exist() -> None:
    examples = [([1] * length, [2] * length) for length in (900, 800, 700, 300, 150, 120)]
    # best fit at 1000 tokens: [900], [800, 150], [700, 300], [120]: the 120-token bin is left out
    stream = packed_batches(examples, tokens_per_batch=1000, row_length=1024)
    seen = sorted(next(stream).num_tokens for _ in range(9))
    assert seen == [900] * 3 + [950] * 3 + [1000] * 3
    only_small = packed_batches(examples[4:], tokens_per_batch=1000, row_length=1024)
    assert next(only_small).num_tokens == 270  # nothing fuller: every bin stays


def test_shared_targets_address_the_same_tokens_in_both_layouts(data) -> None:
    targets = shared_targets(data.shared)
    padded, packed = pad_examples(data.shared), collate(data.shared)
    assert torch.equal(padded.input_ids[targets.rows, targets.columns], packed.input_ids[0, targets.packed])
    assert torch.equal(padded.labels[targets.rows, targets.columns + 1], targets.targets)
    assert targets.targets.numel() == packed.num_trained


def test_long_sequence_is_one_document_of_the_exact_length(data) -> None:
    micro = long_sequence(data.shared + data.rest, 10_000)
    assert micro.input_ids.shape == (1, 10_000) and micro.num_tokens == 10_000
    assert torch.equal(micro.position_ids[0], torch.arange(10_000))


# ---------------------------------------------------------------------------------------------------
# Robustness and comparison
# ---------------------------------------------------------------------------------------------------


def test_a_failing_recipe_is_recorded_not_raised() -> None:
    logged: list[str] = []

    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    def broken() -> None:
        raise RuntimeError("kernel exploded\nsecond line")

    oom, error = RecipeResult("stock", "stock"), RecipeResult("ours", "ours")
    run_guarded(oom, out_of_memory, logged.append)
    run_guarded(error, broken, logged.append)
    assert oom.status == "OOM"
    assert error.status == "error: RuntimeError: kernel exploded"
    assert len(logged) == 2


def test_loss_gaps_are_measured_against_the_cookbook() -> None:
    results = [RecipeResult("ours", ""), RecipeResult("stock", ""), RecipeResult("cookbook", "")]
    losses = {
        "ours": torch.tensor([1.0, 2.0]),
        "stock": torch.tensor([1.5, 2.5]),
        "cookbook": torch.tensor([1.0, 2.2]),
    }
    assert compare_token_losses(results, losses) == "cookbook"
    assert [r.loss_gap for r in results] == pytest.approx([0.1, 0.4, 0.0])


def test_disagreement_is_judged_against_the_noise_between_the_transformers_recipes() -> None:
    def gaps(ours: float, stock: float | None) -> list[RecipeResult]:
        results = [RecipeResult("ours", "", loss_gap=ours), RecipeResult("cookbook", "", loss_gap=0.0)]
        if stock is not None:
            results.insert(1, RecipeResult("stock", "", loss_gap=stock))
        return results

    assert loss_gap_tolerance(gaps(0.3, None)) == LOSS_GAP_TOLERANCE
    assert loss_gap_tolerance(gaps(0.3, 0.26)) == pytest.approx(0.39)  # deep model: more bf16 noise
    assert "0.3000 (disagrees)" in throughput_table(gaps(0.3, 0.1))
    assert "0.3000 |" in throughput_table(gaps(0.3, 0.26))
    assert "1.0000 (disagrees)" in throughput_table(gaps(1.0, 0.26))


# ---------------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bench_runs_every_recipe_on_a_cpu_and_they_agree(tmp_path) -> None:
    record_file = tmp_path / "benchmarks.md"
    record_file.write_text("# Benchmarks\n\nMethod.\n")
    arguments = [
        "bench",
        "--preset",
        "tiny",
        "--tokens-per-batch",
        "1024",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--recipes",
        "ours,ours-eager,stock,cookbook",
        "--no-compile",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "out"),
        "--record",
        "--record-file",
        str(record_file),
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    by_recipe = {r["recipe"]: r for r in report["results"]}
    assert [r["status"] for r in by_recipe.values()] == ["ok", "ok", "ok", "ok"]
    assert report["meta"]["loss_reference"] == "cookbook"
    first_losses = [r["first_loss"] for r in by_recipe.values()]
    assert max(first_losses) - min(first_losses) <= 1e-3
    assert 11.0 < first_losses[0] < 14.0  # ln(201,088) = 12.2, logits of unit scale add a little
    for name in ("ours", "ours-eager", "stock"):
        assert by_recipe[name]["loss_gap"] <= 1e-3  # fp32 on a CPU: the same function
        assert by_recipe[name]["tokens_per_s"] > 0
    recorded = record_file.read_text()
    assert recorded.startswith("# Benchmarks\n\nMethod.\n")
    assert "gptoss-tune bench --preset tiny" in recorded and "| ours-eager | ok |" in recorded
    assert "Kernels of ours: flex attention, grouped experts (grouped_mm)" in recorded  # no FA4 or quack here
    # transformers' flex_attention refuses sinks on a CPU: stock runs its grouped_mm experts with eager attention
    assert "stock: transformers attn=eager, experts=grouped_mm" in recorded
    assert report["meta"]["kernel_packages"] == installed_versions(OPTIONAL_KERNEL_PACKAGES)


def test_bench_bf16_weights_follow_the_seed_and_leave_the_global_generator_alone() -> None:
    config = preset_config("tiny")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_transformers_model(config, torch.device("cpu"), torch.float32, seed=5).state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    again = build_transformers_model(config, torch.device("cpu"), torch.float32, seed=5).state_dict()
    other = build_transformers_model(config, torch.device("cpu"), torch.float32, seed=6).state_dict()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first[name], other[name])


@pytest.mark.slow
def test_long_context_mode_measures_one_sequence_per_length() -> None:
    options = BenchOptions(
        preset="tiny",
        long_context=(256, 512),
        steps=1,
        warmup=0,
        compile=False,
        device="cpu",
        recipes=("ours",),
    )
    report = Bench(options, log=lambda line: None).run()
    assert [(r.recipe, r.length, r.status) for r in report.results] == [
        ("ours", 256, "ok"),
        ("ours", 512, "ok"),
    ]
    assert [r.timed_tokens for r in report.results] == [256, 512]
    assert "one sequence of each length" in markdown(report)


def test_default_micro_batch_is_the_issues_on_a_gpu_and_small_on_a_cpu() -> None:
    """16k tokens padded for the eager-attention recipes on a CPU took more than a 24 GiB machine."""
    assert BenchOptions().for_device(torch.device("cuda")).tokens_per_batch == 16384
    assert BenchOptions().for_device(torch.device("cpu")).tokens_per_batch == 2048
    assert BenchOptions(tokens_per_batch=512).for_device(torch.device("cuda")).tokens_per_batch == 512
    with pytest.raises(GptossTuneError, match="--tokens-per-batch must be positive"):
        BenchOptions(tokens_per_batch=0).validate()


def test_long_context_lengths_must_be_tile_multiples() -> None:
    with pytest.raises(GptossTuneError, match="multiples of 128"):
        BenchOptions(long_context=(1000,)).validate()


def test_recompute_policy_is_checked() -> None:
    assert BenchOptions(recompute="auto").validate().recompute == "auto"
    with pytest.raises(GptossTuneError, match="Unknown --recompute 'everything'; choose layers, auto"):
        BenchOptions(recompute="everything").validate()


# ---------------------------------------------------------------------------------------------------
# MXFP4 expert storage (`--expert-storage mxfp4`)
# ---------------------------------------------------------------------------------------------------


def test_mxfp4_storage_runs_only_our_recipes() -> None:
    with pytest.raises(GptossTuneError, match="mxfp4 runs only ours and ours-eager.*stock, cookbook"):
        BenchOptions(expert_storage="mxfp4", recipes=("ours", "stock", "cookbook")).validate()
    with pytest.raises(GptossTuneError, match="Unknown --expert-storage"):
        BenchOptions(expert_storage="fp8").validate()
    options = with_defaults_for_long_context(BenchOptions(expert_storage="mxfp4"), recipes_given=False)
    assert options.recipes == ("ours",)
    given = replace(options, recipes=("ours", "ours-eager"))
    assert with_defaults_for_long_context(given, recipes_given=True).recipes == ("ours", "ours-eager")
    assert (
        with_defaults_for_long_context(BenchOptions(), recipes_given=False).recipes == BenchOptions().recipes
    )


def test_random_mxfp4_model_has_no_dense_experts_and_sane_values() -> None:
    config = preset_config("tiny")
    model = random_model(
        config, "cpu", torch.float32, storage="mxfp4", seed=0, lm_head_std=0.125, scale_spread=1
    )
    assert expert_storage_of(model) == "mxfp4"
    names = dict(model.named_parameters())
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in names)
    assert not any(param.requires_grad for param in names.values())
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj_blocks.dtype == torch.uint8
    scales = torch.cat([experts.gate_up_proj_scales.flatten(), experts.down_proj_scales.flatten()])
    assert set(scales.unique().tolist()) <= {119, 120, 121}
    dense = experts.gate_up_weight()
    assert dense.shape == experts.weight_shape("gate_up_proj") and dense.dtype == torch.float32
    assert 0.01 < float(dense.std()) < 0.05  # about the published weights' 0.02
    assert float(model.lm_head.weight.std()) == pytest.approx(0.125, rel=0.05)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    # The same values kept dense, and a shared copy that holds no second copy of anything.
    dense_model = random_model(
        config, "cpu", torch.float32, storage="bf16", seed=0, lm_head_std=0.125, scale_spread=1
    )
    assert expert_storage_of(dense_model) == "bf16"
    assert torch.equal(dense_model.model.layers[0].mlp.experts.gate_up_proj, dense)
    copy = shared_copy(model)
    assert copy is not model and expert_storage_of(copy) == "mxfp4"
    for (name, mine), theirs in zip(copy.state_dict().items(), model.state_dict().values(), strict=True):
        assert mine.data_ptr() == theirs.data_ptr(), name
    positions = torch.arange(16).unsqueeze(0)
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(ids, positions), model(ids, positions))
        assert torch.allclose(dense_model(ids, positions), model(ids, positions))


@pytest.mark.slow
def test_bench_with_mxfp4_experts_runs_ours_on_a_cpu_and_records_the_storage(tmp_path) -> None:
    record_file = tmp_path / "benchmarks.md"
    arguments = [
        "bench",
        "--preset",
        "tiny",
        "--expert-storage",
        "mxfp4",
        "--tokens-per-batch",
        "512",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--recipes",
        "ours,ours-eager",
        "--no-compile",
        "--recompute",
        "auto",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "out"),
        "--record",
        "--record-file",
        str(record_file),
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert report["meta"]["expert_storage"] == "mxfp4"
    assert report["meta"]["recompute"] == "auto"
    by_recipe = {r["recipe"]: r for r in report["results"]}
    assert [r["status"] for r in by_recipe.values()] == ["ok", "ok"]
    assert report["meta"]["loss_reference"] == "ours-eager"
    assert by_recipe["ours"]["loss_gap"] <= 1e-3
    assert all(r["tokens_per_s"] > 0 and 11.0 < r["first_loss"] < 14.0 for r in by_recipe.values())
    recorded = record_file.read_text()
    assert "--expert-storage mxfp4" in recorded and "mxfp4 experts" in recorded
    assert "experts stored MXFP4" in recorded and "| ours | ok |" in recorded
    assert "ours checkpoints every layer (a memory plan needs a GPU)" in recorded
    on_a_gpu = describe_meta({**report["meta"], "device": "NVIDIA H200"})
    assert "ours recomputes its norms' outputs, then whole layers or only their experts' gate_up" in on_a_gpu


def test_bench_record_includes_the_components_table(tmp_path, monkeypatch) -> None:
    from gptoss_tune.bench.run import Bench

    timed = [{"component": "experts: stand-in row", "tokens": 256, "ms": 1.5, "peak_mib": 3}]
    monkeypatch.setattr(Bench, "time_components", lambda self, profile_path=None: timed)  # CUDA-only
    record_file = tmp_path / "benchmarks.md"
    arguments = ["bench", "--preset", "tiny", "--recipes", "ours", "--tokens-per-batch", "256"]
    arguments += ["--steps", "1", "--warmup", "0", "--no-compile", "--device", "cpu", "--components"]
    arguments += ["--output", str(tmp_path / "out"), "--record", "--record-file", str(record_file)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "| experts: stand-in row | 256 | 1.50 |" in record_file.read_text()


def test_bench_refuses_transformers_recipes_with_mxfp4_experts(tmp_path) -> None:
    arguments = ["bench", "--preset", "tiny", "--expert-storage", "mxfp4", "--recipes", "ours,cookbook"]
    result = CliRunner().invoke(app, [*arguments, "--device", "cpu", "--output", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, GptossTuneError) and "mxfp4 runs only" in str(result.exception)


def test_padded_shapes_get_one_untimed_step_each_before_timing() -> None:
    def batch(rows: int, length: int) -> StepBatch:
        payload = pad_examples([([1] * length, [1] * length)] * rows)
        return as_step(payload)

    planned = [batch(2, 8), batch(2, 8), batch(1, 16), batch(2, 8), batch(4, 4), batch(1, 16)]
    steps, untimed = with_shape_warmup(planned, warmup=2)
    assert untimed == 4  # 2 warm-up steps + the (1, 16) and (4, 4) shapes once each
    shapes = [tuple(b.payload.input_ids.shape) for b in steps]
    assert shapes[:4] == [(2, 8), (2, 8), (1, 16), (4, 4)]
    assert steps[4:] == planned[2:]  # then every planned timed step, in order
    assert with_shape_warmup(planned, warmup=0) == (planned, 0)  # the first step stays the shared batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the bench's models are bf16
def test_experts_profile_lists_the_grouped_gemms(tmp_path, dtype) -> None:
    from gptoss_tune.bench.components import profile_experts
    from gptoss_tune.kernels import GroupedExperts

    model = GptOss(preset_config("tiny")).to(dtype)
    apply_lora(model, LoraOptions.from_strings(rank=4, alpha=8, targets="experts"))
    path = profile_experts(model, 64, torch.device("cpu"), GroupedExperts(compile=False), tmp_path / "p.txt")
    text = path.read_text()
    assert text.startswith("experts of one layer, 64 tokens") and "grouped_mm" in text
