"""LoRA for our gpt-oss model, saved and loaded in PEFT's format.

Targets: the attention projections q_proj, k_proj, v_proj, o_proj (y += s * dropout(x) A^T B^T) and
the experts' gate_up_proj and down_proj, where each routed token goes through its expert's own
low-rank pair (x A_e B_e); W + BA is never materialized. s = alpha / r, or alpha / sqrt(r) with
rsLoRA. A starts kaiming-uniform as in PEFT and B at zero, so a fresh adapter changes nothing.

PEFT layout (checked against peft 0.21.2 by the tests):
- attention: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in] and
  `...lora_B.weight` [out, r];
- experts (`target_parameters`): PEFT wraps the experts module once per targeted parameter, in the
  order the parameters are registered, so when both are targeted gate_up_proj is the inner wrapper
  (`...mlp.experts.base_layer.lora_A.weight`) and down_proj the outer one
  (`...mlp.experts.lora_A.weight`). lora_A is [E * r, in] with the expert index major (row e * r + j)
  and lora_B is [out, r * E] with the expert index minor (column j * E + e).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import atomic_directory, save_safetensors, write_json
from gptoss_tune.model.gpt_oss import Experts, GptOss
from gptoss_tune.model.sharded import assign_full_, full_tensor

if TYPE_CHECKING:
    from transformers import GptOssConfig

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_TARGETS = ("gate_up_proj", "down_proj")  # PEFT's nesting order: registration order in the experts
TARGET_GROUPS = {"attn": ATTENTION_TARGETS, "experts": EXPERT_TARGETS}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_RECORD = "gptoss_tune_adapter.json"  # ours, beside PEFT's files: how the training data was rendered
PEFT_PREFIX = "base_model.model."

Site = tuple[int, str]  # (layer index, target name)


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0  # attention only: PEFT cannot factor dropout out of expert updates either
    rslora: bool = False
    targets: tuple[str, ...] = ("attn", "experts")  # groups and / or names, e.g. ("q_proj", "down_proj")
    layers: tuple[int, ...] | None = None  # None: every layer

    @classmethod
    def from_strings(
        cls,
        rank: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.0,
        rslora: bool = False,
        targets: str = "attn,experts",
        layers: str | None = None,
    ) -> LoraOptions:
        """Options from command-line spellings: targets "attn,experts" or "q_proj,down_proj";
        layers "0-11,20" (None or "" for every layer)."""
        return cls(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            rslora=rslora,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            layers=parse_layers(layers) if layers else None,
        )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def target_names(self) -> tuple[str, ...]:
        """The targeted projections, in our canonical order."""
        chosen: set[str] = set()
        for target in self.targets:
            if target in TARGET_GROUPS:
                chosen.update(TARGET_GROUPS[target])
            elif target in ATTENTION_TARGETS + EXPERT_TARGETS:
                chosen.add(target)
            else:
                choices = ", ".join([*TARGET_GROUPS, *ATTENTION_TARGETS, *EXPERT_TARGETS])
                raise GptossTuneError(f"Unknown LoRA target '{target}'. Choose from: {choices}.")
        return tuple(name for name in ATTENTION_TARGETS + EXPERT_TARGETS if name in chosen)

    def sites(self, num_layers: int) -> list[Site]:
        if self.rank <= 0:
            raise GptossTuneError(f"LoRA rank must be positive, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise GptossTuneError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        layers = range(num_layers) if self.layers is None else self.layers
        outside = [layer for layer in layers if not 0 <= layer < num_layers]
        if outside:
            raise GptossTuneError(
                f"LoRA layers {outside} do not exist; the model has layers 0..{num_layers - 1}."
            )
        return [(layer, name) for layer in sorted(set(layers)) for name in self.target_names()]


def parse_layers(spec: str) -> tuple[int, ...]:
    """ "0-3,8" -> (0, 1, 2, 3, 8)."""
    layers: set[int] = set()
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            start, end = int(first), int(last if dash else first)
        except ValueError:
            raise GptossTuneError(
                f"Bad LoRA layer list '{spec}': use numbers and ranges, e.g. '0-11,20'."
            ) from None
        if end < start:
            raise GptossTuneError(
                f"Bad LoRA layer range '{part.strip()}' in '{spec}': the end is before the start."
            )
        layers.update(range(start, end + 1))
    return tuple(sorted(layers))


# ---------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------


def _kaiming_uniform_(tensor: Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    # What PEFT's kaiming_uniform_(a=sqrt(5)) draws: U(-1/sqrt(fan_in), 1/sqrt(fan_in)). With a
    # generator the values are drawn where it lives and copied, so a CPU generator seeds GPU adapters.
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        if generator is None or generator.device == tensor.device:
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            drawn = torch.empty(tensor.shape, device=generator.device).uniform_(
                -bound, bound, generator=generator
            )
            tensor.copy_(drawn)


class LoraLinear(nn.Linear):
    """An nn.Linear with a low-rank update; keeps the base `weight` / `bias` (same parameters, same
    state-dict names) and adds `lora_A` [r, in] and `lora_B` [out, r]."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scaling: float,
        dropout: float,
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse the base parameters instead of allocating
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        _kaiming_uniform_(self.lora_A, self.in_features, generator)
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        base = F.linear(x, self.weight, self.bias)
        low_rank = F.linear(self.lora_dropout(x), self.lora_A).flatten(0, -2)
        # base + s * (x A^T) B^T as one GEMM with an accumulating epilogue (no [N, out] temporaries)
        out = torch.addmm(base.flatten(0, -2), low_rank, self.lora_B.t(), alpha=self.scaling)
        return out.view(base.shape)


class ExpertLora(nn.Module):
    """Per-expert low-rank update of one stacked expert projection of `shape` [E, in, out]:
    `lora_A` [E, in, r], `lora_B` [E, r, out]; called with the tokens routed to one expert.
    Built from the shape, not the weight, so it also fits experts stored in MXFP4."""

    def __init__(
        self,
        shape: tuple[int, int, int],
        rank: int,
        scaling: float,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        experts, in_features, out_features = shape
        factory = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(experts, in_features, rank, **factory))
        self.lora_B = nn.Parameter(torch.zeros(experts, rank, out_features, **factory))
        _kaiming_uniform_(self.lora_A, in_features, generator)
        self.scaling = scaling

    def forward(self, routed: Tensor, expert: int) -> Tensor:
        return (routed @ self.lora_A[expert]) @ self.lora_B[expert] * self.scaling


# ---------------------------------------------------------------------------------------------------
# Attaching
# ---------------------------------------------------------------------------------------------------


def _attach(model: GptOss, site: Site, options: LoraOptions, generator: torch.Generator | None) -> None:
    layer_index, name = site
    layer = model.model.layers[layer_index]
    if name in ATTENTION_TARGETS:
        base = getattr(layer.self_attn, name)
        if isinstance(base, LoraLinear):
            raise GptossTuneError(f"Layer {layer_index} {name} already has a LoRA adapter.")
        setattr(
            layer.self_attn, name, LoraLinear(base, options.rank, options.scaling, options.dropout, generator)
        )
        return
    experts: Experts = layer.mlp.experts
    slot = "gate_up_lora" if name == "gate_up_proj" else "down_lora"
    if getattr(experts, slot) is not None:
        raise GptossTuneError(f"Layer {layer_index} {name} already has a LoRA adapter.")
    bias = getattr(experts, f"{name}_bias")  # device and dtype of the projection, whatever its storage
    shape, factory = experts.weight_shape(name), {"device": bias.device, "dtype": bias.dtype}
    adapter = ExpertLora(shape, options.rank, options.scaling, generator, **factory)
    setattr(experts, slot, adapter)


def adapters_to_fp32(params: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
    """Keep the adapters (and so their optimizer state) in fp32; autocast computes in bf16."""
    for param in params.values():
        param.data = param.data.float()
    return params


def apply_lora(
    model: GptOss,
    options: LoraOptions,
    sites: Iterable[Site] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, nn.Parameter]:
    """Freeze the model, attach LoRA at `sites` (default: every target of every selected layer) and
    return the trainable parameters by name."""
    chosen = list(sites) if sites is not None else options.sites(len(model.model.layers))
    model.requires_grad_(False)
    for site in chosen:
        _attach(model, site, options, generator)
    trainable = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    for param in trainable.values():
        param.requires_grad_(True)
    return trainable


def reset_lora_parameters(params: Mapping[str, Tensor], seed: int) -> None:
    """Re-draw every adapter as PEFT initializes it (A ~ U(+-1/sqrt(in)), B = 0) from `seed`, on the CPU
    in name order: the same values on any device, for any sharding (FSDP shards get their slice)."""
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(params):
        param = params[name]
        if "lora_B" in name:
            value = torch.zeros(param.shape)
        else:
            bound = 1.0 / math.sqrt(param.shape[1])  # in_features: A is [r, in] or [E, in, r]
            value = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
        assign_full_(param, value)


def _lora_modules(model: GptOss) -> Iterator[tuple[Site, LoraLinear | ExpertLora]]:
    for index, layer in enumerate(model.model.layers):
        for name in ATTENTION_TARGETS:
            module = getattr(layer.self_attn, name)
            if isinstance(module, LoraLinear):
                yield (index, name), module
        for name, slot in (("gate_up_proj", "gate_up_lora"), ("down_proj", "down_lora")):
            module = getattr(layer.mlp.experts, slot)
            if module is not None:
                yield (index, name), module


def lora_sites(model: GptOss) -> list[Site]:
    return [site for site, _ in _lora_modules(model)]


def trainable_parameter_report(model: GptOss) -> dict[str, int]:
    """Trainable LoRA parameters per target, plus `trainable` and `total` parameter counts."""
    report = dict.fromkeys(ATTENTION_TARGETS + EXPERT_TARGETS, 0)
    for (_, name), module in _lora_modules(model):
        report[name] += sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    report = {name: count for name, count in report.items() if count}
    report["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    mxfp4_values = sum(2 * b.numel() for name, b in model.named_buffers() if name.endswith("_blocks"))
    report["total"] = sum(p.numel() for p in model.parameters()) + mxfp4_values  # MXFP4: 2 values a byte
    return report


# ---------------------------------------------------------------------------------------------------
# PEFT layout
# ---------------------------------------------------------------------------------------------------


def _peft_module_path(site: Site, expert_targets_in_layer: Iterable[str]) -> str:
    layer, name = site
    if name in ATTENTION_TARGETS:
        return f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{name}"
    nested = name == "gate_up_proj" and "down_proj" in expert_targets_in_layer
    return f"{PEFT_PREFIX}model.layers.{layer}.mlp.experts" + (".base_layer" if nested else "")


def _expert_targets_by_layer(sites: Iterable[Site]) -> dict[int, set[str]]:
    by_layer: dict[int, set[str]] = {}
    for layer, name in sites:
        if name in EXPERT_TARGETS:
            by_layer.setdefault(layer, set()).add(name)
    return by_layer


def peft_keys(site: Site, sites: Iterable[Site]) -> tuple[str, str]:
    """PEFT's (lora_A, lora_B) state-dict keys for one site of an adapter with these sites."""
    path = _peft_module_path(site, _expert_targets_by_layer(sites).get(site[0], ()))
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def expert_lora_to_peft(lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
    """Ours A [E, in, r], B [E, r, out] -> PEFT A [E * r, in] (expert major), B [out, r * E] (expert minor)."""
    experts, in_features, rank = lora_a.shape
    out_features = lora_b.shape[-1]
    return (
        lora_a.transpose(1, 2).reshape(experts * rank, in_features),
        lora_b.permute(2, 1, 0).reshape(out_features, rank * experts),
    )


def expert_lora_from_peft(peft_a: Tensor, peft_b: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Inverse of `expert_lora_to_peft`."""
    in_features = peft_a.shape[1]
    out_features = peft_b.shape[0]
    rank = peft_a.shape[0] // num_experts
    return (
        peft_a.view(num_experts, rank, in_features).transpose(1, 2).contiguous(),
        peft_b.view(out_features, rank, num_experts).permute(2, 1, 0).contiguous(),
    )


def lora_state_dict_peft(model: GptOss, gradients: bool = False) -> dict[str, Tensor]:
    """The adapter weights (or, with `gradients`, their gradients) under PEFT's exact keys and shapes."""
    modules = list(_lora_modules(model))
    sites = [site for site, _ in modules]
    state: dict[str, Tensor] = {}
    for site, module in modules:
        key_a, key_b = peft_keys(site, sites)
        lora_a, lora_b = (
            (module.lora_A.grad, module.lora_B.grad) if gradients else (module.lora_A, module.lora_B)
        )
        lora_a, lora_b = full_tensor(lora_a), full_tensor(lora_b)
        if isinstance(module, ExpertLora):
            lora_a, lora_b = expert_lora_to_peft(lora_a, lora_b)
        state[key_a], state[key_b] = lora_a.detach().contiguous(), lora_b.detach().contiguous()
    return state


def adapter_config(
    options: LoraOptions, sites: list[Site], base_model_name_or_path: str | None
) -> dict[str, Any]:
    """adapter_config.json for PEFT: attention targets as `target_modules`, experts as
    `target_parameters` (PEFT applies `layers_to_transform` to modules only, so a layer selection
    is spelled out per layer for the experts)."""
    from peft import LoraConfig

    all_layers = options.layers is None
    attention = sorted({name for _, name in sites if name in ATTENTION_TARGETS})
    experts = [name for name in EXPERT_TARGETS if any(n == name for _, n in sites)]
    if all_layers:
        target_parameters = [f"mlp.experts.{name}" for name in experts]
    else:
        target_parameters = [
            f"layers.{layer}.mlp.experts.{name}"
            for layer in sorted({i for i, _ in sites})
            for name in experts
        ]
    config = LoraConfig(
        r=options.rank,
        lora_alpha=options.alpha,
        # PEFT refuses dropout together with target_parameters; dropout does not matter at inference.
        lora_dropout=0.0 if experts else options.dropout,
        use_rslora=options.rslora,
        target_modules=attention or None,
        target_parameters=target_parameters or None,
        layers_to_transform=None if all_layers or not attention else sorted(set(options.layers)),
        layers_pattern=None if all_layers or not attention else "layers",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
        bias="none",
        inference_mode=True,  # as PEFT's save_pretrained writes it
    ).to_dict()
    config["target_modules"] = attention or None  # a sorted list, not PEFT's set: same file every time
    return json.loads(json.dumps(config, default=str))


def save_adapter(
    model: GptOss,
    options: LoraOptions,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    state: dict[str, Tensor] | None = None,
    record: dict | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's format, atomically, and
    `record` (what the adapter was trained on) as ADAPTER_RECORD, which PEFT ignores.

    `state` is `lora_state_dict_peft(model)` when the caller already gathered it (FSDP: every rank
    gathers, one writes)."""
    sites = lora_sites(model)
    if not sites:
        raise GptossTuneError("The model has no LoRA adapter to save.")
    state = lora_state_dict_peft(model) if state is None else state
    with atomic_directory(out_dir, overwrite=overwrite) as directory:
        save_safetensors(
            {k: v.cpu() for k, v in state.items()}, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"}
        )
        write_json(directory / ADAPTER_CONFIG, adapter_config(options, sites, base_model_name_or_path))
        if record is not None:
            write_json(directory / ADAPTER_RECORD, record)
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------
# Reading PEFT adapters (ours or anyone's)
# ---------------------------------------------------------------------------------------------------

_ATTENTION_KEY = re.compile(
    rf"{re.escape(PEFT_PREFIX)}model\.layers\.(\d+)\.self_attn\.(\w+)\.lora_A\.weight"
)
_EXPERTS_KEY = re.compile(
    rf"{re.escape(PEFT_PREFIX)}model\.layers\.(\d+)\.mlp\.experts\.((?:base_layer\.)*)lora_A\.weight"
)


def _expert_sites_from_keys(layer: int, nestings: list[int], target_parameters: list[str]) -> list[Site]:
    """The expert projections adapted in one layer: those `target_parameters` names, matched as PEFT
    does (whole name or "."-bounded suffix). Checks that the wrappers found in the weights agree."""
    targeted = []
    for name in EXPERT_TARGETS:
        full = f"model.layers.{layer}.mlp.experts.{name}"
        if any(full == entry or full.endswith(f".{entry}") for entry in target_parameters):
            targeted.append(name)
    if sorted(nestings) != list(range(len(targeted))):
        raise GptossTuneError(
            f"Adapter layer {layer}: the expert LoRA weights do not match target_parameters {target_parameters}."
        )
    return [(layer, name) for name in targeted]


def read_adapter(adapter_dir: str | Path) -> tuple[LoraOptions, list[Site], dict[str, Tensor]]:
    """(options, sites, PEFT state dict) of a PEFT LoRA adapter directory."""
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise GptossTuneError(
            f"{adapter_dir}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a PEFT LoRA adapter)."
        )
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise GptossTuneError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}, only LORA is supported."
        )
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if config.get(unsupported):
            raise GptossTuneError(f"{config_file}: per-module {unsupported} is not supported.")
    if config.get("use_dora") or config.get("lora_bias") or config.get("modules_to_save"):
        raise GptossTuneError(f"{config_file}: DoRA, LoRA biases and modules_to_save are not supported.")

    state = load_file(weights_file)
    sites: list[Site] = []
    expert_nestings: dict[int, list[int]] = {}
    for key in state:
        if not key.endswith("lora_A.weight"):
            continue
        if match := _ATTENTION_KEY.fullmatch(key):
            if match[2] not in ATTENTION_TARGETS:
                raise GptossTuneError(f"{weights_file}: LoRA on '{match[2]}' is not supported.")
            sites.append((int(match[1]), match[2]))
        elif match := _EXPERTS_KEY.fullmatch(key):
            expert_nestings.setdefault(int(match[1]), []).append(match[2].count("base_layer."))
        else:
            raise GptossTuneError(f"{weights_file}: unexpected LoRA weight '{key}'.")
    for layer, nestings in expert_nestings.items():
        sites.extend(_expert_sites_from_keys(layer, nestings, list(config.get("target_parameters") or [])))

    sites.sort()
    expected_keys = {key for site in sites for key in peft_keys(site, sites)}
    if expected_keys != set(state):
        odd = sorted(expected_keys ^ set(state))[:3]
        raise GptossTuneError(f"{weights_file}: LoRA A and B weights do not pair up, e.g. {odd}.")
    options = LoraOptions(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora")),
        targets=tuple(sorted({name for _, name in sites})),
        layers=tuple(sorted({layer for layer, _ in sites})),
    )
    return options, sites, state


def peft_shapes(config: GptOssConfig, site: Site, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The shapes of a site's (lora_A, lora_B) in a PEFT adapter file for a model of `config`."""
    _, name = site
    heads = config.num_attention_heads * config.head_dim
    kv_heads = config.num_key_value_heads * config.head_dim
    in_out = {
        "q_proj": (config.hidden_size, heads),
        "k_proj": (config.hidden_size, kv_heads),
        "v_proj": (config.hidden_size, kv_heads),
        "o_proj": (heads, config.hidden_size),
        "gate_up_proj": (config.hidden_size, 2 * config.intermediate_size),
        "down_proj": (config.intermediate_size, config.hidden_size),
    }
    in_features, out_features = in_out[name]
    rows = rank * config.num_local_experts if name in EXPERT_TARGETS else rank  # experts stack theirs
    return (rows, in_features), (out_features, rows)


def check_adapter_fits(
    config: GptOssConfig,
    options: LoraOptions,
    sites: list[Site],
    state: Mapping[str, Tensor],
    where: str | Path,
) -> None:
    """Every adapter tensor has the shape a model of `config` needs: an adapter trained for another
    model (another expert count, hidden size...) is refused before anything is merged into it."""
    for site in sites:
        expected = peft_shapes(config, site, options.rank)
        for key, shape in zip(peft_keys(site, sites), expected, strict=True):
            if tuple(state[key].shape) != shape:
                raise GptossTuneError(
                    f"{where}: {key} has shape {tuple(state[key].shape)}, but this base model needs {shape} "
                    f"at rank {options.rank}: the adapter was trained for another model."
                )


def _set_site_weights(module: LoraLinear | ExpertLora, peft_a: Tensor, peft_b: Tensor, where: str) -> None:
    if isinstance(module, ExpertLora):
        experts, in_features, rank = module.lora_A.shape
        expected = ((experts * rank, in_features), (module.lora_B.shape[-1], rank * experts))
    else:
        expected = (tuple(module.lora_A.shape), tuple(module.lora_B.shape))
    if (tuple(peft_a.shape), tuple(peft_b.shape)) != expected:
        raise GptossTuneError(
            f"{where}: LoRA shapes {tuple(peft_a.shape)}, {tuple(peft_b.shape)} do not fit the model {expected}."
        )
    if isinstance(module, ExpertLora):
        peft_a, peft_b = expert_lora_from_peft(peft_a, peft_b, module.lora_A.shape[0])
    assign_full_(module.lora_A, peft_a)
    assign_full_(module.lora_B, peft_b)


def load_adapter(model: GptOss, adapter_dir: str | Path) -> LoraOptions:
    """Load a PEFT LoRA adapter into the model, attaching LoRA first if the model has none (resume,
    merge, evaluation). Returns the adapter's options."""
    options, sites, state = read_adapter(adapter_dir)
    present = lora_sites(model)
    if not present:
        apply_lora(model, options, sites)
    elif sorted(present) != sites:
        raise GptossTuneError(
            f"{adapter_dir}: the adapter's targets differ from the LoRA already on the model."
        )
    modules = dict(_lora_modules(model))
    for site in sites:
        key_a, key_b = peft_keys(site, sites)
        modules[site].scaling = options.scaling
        _set_site_weights(modules[site], state[key_a], state[key_b], f"{adapter_dir} {key_a}")
    return options


# ---------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------


def base_tensor_name(site: Site) -> str:
    """The base model tensor an adapter site modifies."""
    layer, name = site
    if name in ATTENTION_TARGETS:
        return f"model.layers.{layer}.self_attn.{name}.weight"
    return f"model.layers.{layer}.mlp.experts.{name}"


def _delta(name: str, peft_a: Tensor, peft_b: Tensor, scaling: float, num_experts: int) -> Tensor:
    """W' - W for one base tensor, in its own orientation (fp32)."""
    peft_a, peft_b = peft_a.float(), peft_b.float()
    if name.endswith(("gate_up_proj", "down_proj")):
        lora_a, lora_b = expert_lora_from_peft(peft_a, peft_b, num_experts)
        return torch.bmm(lora_a, lora_b) * scaling  # [E, in, out]
    return (peft_b @ peft_a) * scaling  # [out, in]


def merge_lora_into_state_dict(
    tensors: Iterable[tuple[str, Tensor]],
    options: LoraOptions,
    sites: list[Site],
    adapter: Mapping[str, Tensor],
) -> Iterator[tuple[str, Tensor]]:
    """Stream (name, tensor) pairs of a base model with the adapter folded in: W + s * B A per
    attention projection, W_e + s * A_e B_e per expert ([E, in, out]). Sums in fp32, returns the
    base dtype. Use with `read_adapter` and `iter_checkpoint_tensors` / `save_checkpoint`."""
    targets = {base_tensor_name(site): peft_keys(site, sites) for site in sites}
    merged = set()
    for name, tensor in tensors:
        if name in targets:
            key_a, key_b = targets[name]
            num_experts = tensor.shape[0] if tensor.dim() == 3 else 1
            delta = _delta(name, adapter[key_a], adapter[key_b], options.scaling, num_experts).to(
                tensor.device
            )
            tensor = (tensor.float() + delta).to(tensor.dtype)
            merged.add(name)
        yield name, tensor
    if missing := set(targets) - merged:
        raise GptossTuneError(
            f"The base model has no tensors {sorted(missing)[:3]} that the adapter modifies."
        )
