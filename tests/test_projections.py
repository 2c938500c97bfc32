"""The stacked q/k/v projections (`kernels.projections`) against the separate nn.Linear / LoraLinear
calls they replace: outputs and every gradient, in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gptoss_tune.kernels.projections import StackedProjections
from gptoss_tune.model.gpt_oss import NormSource, RMSNorm, separate_projections
from gptoss_tune.model.lora import LoraLinear
from test_kernels import relative_error, saved_bytes

IN, OUTS = 48, (64, 16, 16)  # gpt-oss's proportions: a wide query, narrow key and value


def projections(
    adapted: tuple[bool, ...], rank: int = 4, bias: bool = True, seed: int = 0
) -> list[nn.Linear]:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for index, (out, with_lora) in enumerate(zip(OUTS, adapted, strict=True)):
        base = nn.Linear(IN, out, bias=bias)
        with torch.no_grad():
            base.weight.copy_(0.2 * torch.randn(base.weight.shape, generator=generator))
            if bias:
                base.bias.copy_(torch.randn(out, generator=generator))
        base.requires_grad_(False)
        if with_lora:
            # different ranks and scalings per projection (1.5: not a power of two)
            layer = LoraLinear(
                base, rank + index, scaling=(2.0, 1.5, 0.5)[index], dropout=0.0, generator=generator
            )
            with torch.no_grad():
                layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator))
            base = layer
        layers.append(base)
    return layers


def outputs_and_grads(fn, layers, hidden, probes):
    outs = fn(layers, hidden)
    trained = [hidden] + [p for layer in layers for p in layer.parameters() if p.requires_grad]
    loss = sum((out.float() * probe).sum() for out, probe in zip(outs, probes, strict=True))
    return [o.detach() for o in outs], torch.autograd.grad(loss, trained)


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 37, IN, generator=generator, requires_grad=True)
    probes = [torch.randn(2, 37, out, generator=generator) for out in OUTS]
    return hidden, probes


@pytest.mark.parametrize(
    "adapted,bias",
    [
        ((True, True, True), True),
        ((True, False, True), True),
        ((False, False, False), True),
        ((True, True, True), False),
    ],
    ids=["all", "query-and-value", "none", "no-bias"],
)
def test_stacked_projections_match_the_separate_calls_in_fp32(adapted, bias) -> None:
    layers = projections(adapted, bias=bias)
    hidden, probes = inputs()
    check_against_separate_calls(layers, hidden, probes)


def test_one_projection_alone_matches_its_call() -> None:  # the output projection
    hidden, probes = inputs()
    check_against_separate_calls(projections((True, False, False))[:1], hidden, probes[:1])


def check_against_separate_calls(layers, hidden, probes) -> None:
    stacked = StackedProjections()
    assert stacked.can_run(layers)
    expected_outs, expected_grads = outputs_and_grads(separate_projections, layers, hidden, probes)
    actual_outs, actual_grads = outputs_and_grads(stacked, layers, hidden, probes)
    for actual, expected in zip(
        actual_outs + list(actual_grads), expected_outs + list(expected_grads), strict=True
    ):
        assert actual.shape == expected.shape
        assert relative_error(actual, expected) <= 1e-5


def test_stacked_projections_in_bf16_are_as_accurate_as_the_separate_calls() -> None:
    layers = projections((True, True, True))
    hidden, probes = inputs(seed=2)
    truth_outs, truth_grads = outputs_and_grads(separate_projections, layers, hidden, probes)
    results = {}
    for name, fn in (("separate", separate_projections), ("stacked", StackedProjections())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs, grads = outputs_and_grads(fn, layers, hidden, probes)
        assert all(out.dtype == torch.bfloat16 for out in outs)
        results[name] = [
            relative_error(a, b)
            for a, b in zip(outs + list(grads), truth_outs + list(truth_grads), strict=True)
        ]
    for separate_error, stacked_error in zip(results["separate"], results["stacked"], strict=True):
        assert stacked_error <= 2 * separate_error + 1e-3  # bf16 rounding, never a wrong term (~1)


def test_stacked_projections_leave_dropout_and_trainable_bases_to_the_separate_calls() -> None:
    hidden, _ = inputs()
    with_dropout = projections((True, True, True))
    with_dropout[1].lora_dropout = nn.Dropout(0.1)
    trainable = projections((True, False, False))
    trainable[2].weight.requires_grad_(True)
    stacked = StackedProjections()
    for layers in (with_dropout, trainable):
        assert not stacked.can_run(layers)
    with_dropout[1].eval()
    for got, want in zip(
        stacked(with_dropout, hidden), separate_projections(with_dropout, hidden), strict=True
    ):
        assert torch.equal(got, want)


def test_narrow_outputs_do_not_keep_the_stacked_output_alive() -> None:
    hidden, _ = inputs()
    query, key, value = StackedProjections()(projections((True, True, True)), hidden)
    for narrow in (key, value):  # attention saves the value: it must not pin the [N, sum out] buffer
        assert narrow.untyped_storage().nbytes() == narrow.numel() * narrow.element_size()
    assert query.shape[-1] == OUTS[0]


def frozen_norm(size: int, seed: int = 3) -> RMSNorm:
    norm = RMSNorm(size, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(size, generator=torch.Generator().manual_seed(seed)))
    return norm.requires_grad_(False)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("adapted", [(True, True, True), (False, False, False)], ids=["lora", "no-lora"])
def test_projections_of_a_norms_output_keep_its_input_instead_for_the_same_gradients(
    autocast, adapted
) -> None:
    layers, norm = projections(adapted), frozen_norm(IN)
    hidden, probes = inputs()

    def run(recompute_norm: bool):
        source = NormSource(hidden, norm) if recompute_norm else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return StackedProjections()(layers, norm(hidden), source)

    def outputs_and_grads_through_the_norm(recompute_norm: bool):
        outs = run(recompute_norm)
        trained = [hidden] + [p for layer in layers for p in layer.parameters() if p.requires_grad]
        loss = sum((out.float() * probe).sum() for out, probe in zip(outs, probes, strict=True))
        return [o.detach() for o in outs], torch.autograd.grad(loss, trained)

    kept_outs, kept_grads = outputs_and_grads_through_the_norm(recompute_norm=False)
    again_outs, again_grads = outputs_and_grads_through_the_norm(recompute_norm=True)
    for got, want in zip(again_outs + list(again_grads), kept_outs + list(kept_grads), strict=True):
        assert torch.equal(got, want)
    kept_bytes = saved_bytes(lambda: run(recompute_norm=False))
    again_bytes = saved_bytes(lambda: run(recompute_norm=True))
    normed_bytes = hidden.numel() * (2 if autocast else 4)  # what the projections read
    # without adapters the input is never kept (only the LoRA gradients read it)
    assert kept_bytes - again_bytes == (normed_bytes if any(adapted) else 0)
    if not any(adapted):  # the base weights alone are kept
        weight_bytes = sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)
        assert saved_bytes(lambda: StackedProjections()(layers, hidden)) == weight_bytes
