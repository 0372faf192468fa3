"""A projection edit is exactly a rank-k LoRA (`B = −λU`, `A = UᵀW`, `lora_alpha = r`): write it in PEFT's format.

Linear writers are LoRA `target_modules`; stacked expert weights (fused MoE experts, `[E, d, in]`) are LoRA
`target_parameters`, which PEFT wraps in a `ParamWrapper` holding every expert's pair in one `lora_A`
`[E·k, in]` (row `e·k + j` is expert e's A row j) and one `lora_B` `[d, k·E]` (column `j·E + e`).

Transposed writers: a `Conv1D` (GPT-2) is a LoRA target like a Linear (PEFT runs it with `fan_in_fan_out`, the
factors act on activations); transposed stacked experts (gpt-oss, `[E, in, d]`) are `target_parameters` whose
factors act on activations as well (PEFT reads the experts' `is_transposed`). Biased writers: the bias is projected too, `b ← (I − λUUᵀ) b`. For Linear
targets that is the bias of LoRA's B (`lora_bias=True`: B's bias is the bias delta, zero for writers without a
bias); stacked experts' biases `[E, d]` are a 2-D `target_parameters` entry (rank k: `B = −λ b U`, `A = Uᵀ`). PEFT
refuses `lora_bias` beside `target_parameters`, so where both occur (gpt-oss: biased attention output beside
biased experts) the biased Linear writers are saved whole, edited, as `modules_to_save`.

Tied halves (DiffusionGemma: the encoder's and the decoder's layer modules hold the same tensors): PEFT wraps
exactly the modules its targets name, so an adapter on one half would be invisible to the other. Each site is
therefore targeted under every module name that runs its weights, with the same factors: the loaded (unmerged)
`PeftModel` runs the edit once in each half, as the weight form does. PEFT's `merge_and_unload` would then merge
each wrapper into the one shared tensor, applying the delta twice: for a merged checkpoint use `save_merged_model`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from subspace.interventions.edit import ProjectionEdit
from subspace.interventions.sites import Site, resolve_sites
from subspace.utils.io import atomic_dir

log = logging.getLogger(__name__)


def _retargeted_by_peft(config: LoraConfig, model: nn.Module) -> set[str]:
    """Target modules PEFT itself would re-target on load: for MoE model types whose experts transformers 5 fused,
    its v4→v5 shim reads a module target named like a v4 expert projection (the down projection of a Qwen-MoE or OLMoE
    model: a dense layer's MLP, a shared expert) as the stacked expert parameter. Asked of PEFT, not guessed."""
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # a PEFT without the shim targets modules as named
        return set()
    trial = copy.deepcopy(config)
    convert_peft_config_for_transformers(trial, model=model, conversions=None)
    return set(config.target_modules) - set(trial.target_modules)


def _refused_by_peft(config: LoraConfig, model: nn.Module) -> set[str]:
    """Target modules PEFT refuses to wrap with LoRA in this model (a Mamba mixer's `out_proj`: its fused kernels read
    the weight directly, past a LoRA wrapper): they are saved whole, edited. Asked of PEFT, not guessed."""
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:
        return set()
    refused = set()
    for name in config.target_modules:
        try:
            _check_lora_target_modules_mamba(config, model, name.rpartition(".")[2])
        except ValueError:
            refused.add(name)
    return refused


def _stacked_lora(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert factors A [E, k, in], B [E, d, k] in PEFT ParamWrapper's layout: ([E·k, in], [d, k·E])."""
    experts, d, k = b.shape
    return a.reshape(experts * k, -1), b.permute(1, 2, 0).reshape(d, k * experts)


def _names_everywhere(model: nn.Module, sites: list[Site]) -> dict[str, list[str]]:
    """Each site's name, then the names of the modules (or their parameter) sharing its weights (`Site.aliases`)."""
    module_names = {id(m): n for n, m in model.named_modules()}
    return {site.name: [site.name] + [module_names[id(m)] + (f".{site.parameter}" if site.stacked else "")
                                      for m in site.aliases] for site in sites}


def export_peft_adapter(edit: ProjectionEdit, model: nn.Module, out_dir: str | Path, base_model: str | None = None,
                        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """Adapter directory loadable with `PeftModel.from_pretrained(base, out_dir)`; the model is not modified.

    `factors`: `edit.lora_factors(model)` when already computed (a sharded model's, which every rank had to gather).
    Written to a temporary sibling and renamed, so a half-written adapter never exists.
    """
    dtype = next(model.parameters()).dtype
    # Diffusion models (LLaDA; DiffusionGemma, whose generate is not transformers' GenerationMixin): plain PeftModel.
    causal = getattr(model, "can_generate", lambda: False)() and hasattr(model, "prepare_inputs_for_generation")
    task_type = "CAUSAL_LM" if causal else None
    sites = resolve_sites(model, edit.sites, edit.expert_masks)
    names = _names_everywhere(model, sites)
    if any(len(n) > 1 for n in names.values()):
        log.warning("the edited tensors are shared by several modules (tied halves): the adapter targets each of them "
                    "with the same factors; do not merge it with PEFT's merge_and_unload (that applies the delta once "
                    "per module, so twice to a shared tensor), use save_merged_model for a merged checkpoint")
    stacked = {name for site in sites if site.stacked for name in names[site.name]}
    settings = dict(r=edit.rank, lora_alpha=edit.rank, lora_dropout=0.0, bias="none", task_type=task_type,
                    base_model_name_or_path=base_model)
    modules = [name for site in sites if not site.stacked for name in names[site.name]]
    retargeted = _retargeted_by_peft(LoraConfig(target_modules=modules, **settings), model)
    by_name = {name: site for site in sites for name in names[site.name]}
    stacked_biases = {f"{name.rpartition('.')[0]}.{by_name[name].bias}": name for name in stacked
                      if by_name[name].bias is not None}
    biased = {name for name in modules if by_name[name].bias is not None}
    parameter_targets = bool(stacked) or bool(retargeted & set(modules))
    saved_whole = (biased if parameter_targets else set()) | _refused_by_peft(  # PEFT: no lora_bias beside
        LoraConfig(target_modules=modules, **settings), model)                 # target_parameters; refused targets
    biased -= saved_whole
    lora_bias = bool(biased) and not parameter_targets
    if any(by_name[name].transposed for name in modules):
        settings["fan_in_fan_out"] = True  # Conv1D targets (PEFT would set it itself, with a warning)
    # A retargeted Linear is named by its weight instead: a 2-D ParamWrapper is an ordinary LoRA, same keys and shapes.
    parameters = sorted(stacked) + sorted(stacked_biases) + [f"{name}.weight" for name in modules
                                                              if name in retargeted and name not in saved_whole]
    config = LoraConfig(target_modules=[name for name in modules if name not in retargeted and name not in saved_whole],
                        **({"target_parameters": parameters} if parameters else {}),
                        **({"modules_to_save": sorted(saved_whole)} if saved_whole else {}),
                        **({"lora_bias": True} if lora_bias else {}), **settings)
    tensors = {}
    if not config.target_modules and not parameters:  # PEFT needs a LoRA target: a no-op one (B = 0) when all are
        placeholder = next(n for n, m in model.named_modules()  # saved whole
                           if isinstance(m, nn.Linear) and n not in saved_whole and not _refused_by_peft(
                               LoraConfig(target_modules=[n], **settings), model))
        config.target_modules = {placeholder}
        linear = model.get_submodule(placeholder)
        tensors[f"base_model.model.{placeholder}.lora_A.weight"] = torch.zeros(edit.rank, linear.in_features, dtype=dtype)
        tensors[f"base_model.model.{placeholder}.lora_B.weight"] = torch.zeros(linear.out_features, edit.rank, dtype=dtype)
    factors = edit.lora_factors(model) if factors is None else factors
    bias_deltas = edit.bias_deltas(model) if any(site.bias is not None for site in sites) else {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for canonical, site_factors in factors.items():
        site_obj = next(s for s in sites if s.name == canonical)
        delta_b = bias_deltas.get(site_obj.bias_name) if site_obj.bias is not None else None
        for site in names[canonical]:
            a, b = site_factors
            if site in saved_whole:  # the edited module itself: W + (B A) in its layout, b + Δb
                weight = params[f"{site}.weight"]
                delta = (b @ a).T if site_obj.transposed else b @ a
                tensors[f"base_model.model.{site}.weight"] = (weight.detach().float().cpu() + delta).to(dtype)
                if delta_b is not None:
                    tensors[f"base_model.model.{site}.bias"] = (params[f"{site}.bias"].detach().float().cpu()
                                                                + delta_b).to(dtype)
                continue
            if site in stacked:  # PEFT keys a parameter's LoRA by the module holding it
                module = site.rpartition(".")[0]
                if site_obj.transposed and not getattr(site_obj.module, "is_transposed", False):
                    a, b = b.transpose(-1, -2), a.transpose(-1, -2)  # PEFT reads undeclared [E, x, y] as B_e A_e
                if delta_b is not None:  # the experts' bias [E, d] = B A with B = −λ b U [E, k], A = Uᵀ [k, d]
                    basis = edit.bases[edit.sites.index(canonical)]
                    lam = edit.strengths[edit.sites.index(canonical)]
                    bias = params[f"{module}.{site_obj.bias}"].detach().float().cpu()
                    mask = site_obj.expert_mask
                    bb = -lam * (bias @ basis)
                    bb = bb if mask is None else mask.float()[:, None] * bb
                    tensors[f"base_model.model.{module}.lora_A.weight"] = basis.T.to(dtype).contiguous()
                    tensors[f"base_model.model.{module}.lora_B.weight"] = bb.to(dtype).contiguous()
                    module = f"{module}.base_layer"  # PEFT nests the wrappers: the weight's, listed first, is inside
                site, (a, b) = module, _stacked_lora(a, b)
            tensors[f"base_model.model.{site}.lora_A.weight"] = a.to(dtype, copy=True).contiguous()  # copies: one
            tensors[f"base_model.model.{site}.lora_B.weight"] = b.to(dtype, copy=True).contiguous()  # per name
            if lora_bias:
                tensors[f"base_model.model.{site}.lora_B.bias"] = (
                    torch.zeros(b.shape[0]) if delta_b is None else delta_b).to(dtype).contiguous()
    with atomic_dir(out_dir) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)


@torch.no_grad()
def save_merged_model(edit: ProjectionEdit, model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """A plain transformers checkpoint with `W ← W + B A` applied to a copy (the loaded model is untouched)."""
    merged = copy.deepcopy(model)
    for name, delta in edit.weight_deltas(model).items():
        weight = merged.get_parameter(name)
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def _factor_fits(part: str, factor: torch.Tensor, weight: torch.Tensor, model: nn.Module | None = None,
                 site: str = "") -> bool:
    """LoRA shapes: A [r, in], B [out, r] for a matrix; A [E·r, in], B [out, r·E] for stacked experts [E, out, in]
    (transposed ones, [E, in, out], and Conv1D weights [in, out] the other way round)."""
    experts = weight.shape[0] if weight.ndim == 3 else 1
    fan_out, fan_in = weight.shape[-2:]
    holder = model.get_submodule(site) if model is not None and site else None
    if holder is not None and (getattr(holder, "is_transposed", False) and weight.ndim == 3
                               or type(holder).__name__ == "Conv1D"):
        fan_out, fan_in = fan_in, fan_out
    if part == "A":
        return factor.shape[1] == fan_in and factor.shape[0] % experts == 0
    return factor.shape[0] == fan_out and factor.shape[1] % experts == 0


def check_adapter_fits(model: nn.Module, adapter_dir: str | Path, base_model: str | None = None) -> None:
    """Refuse an adapter made for another base before PEFT loads it: a different recorded base name, a module the
    model lacks, or a LoRA factor whose shape does not fit the model's weight (PEFT would fail later, or worse,
    load a same-shaped adapter of another model silently)."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    recorded = config.get("base_model_name_or_path")
    if base_model is not None and recorded is not None and recorded != base_model:
        raise ValueError(f"adapter {adapter_dir} was made for base model {recorded!r}, not {base_model!r}; "
                         "load it onto the model it was trained on")
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied tensor under each module's name
    stacked: dict[str, list[str]] = {}  # module → its target parameters, in order (PEFT nests the first innermost)
    for name in config.get("target_parameters") or []:
        stacked.setdefault(name.rpartition(".")[0], []).append(name)
    for key, factor in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        key = key.removeprefix("base_model.model.")
        if ".lora_" not in key:  # a module saved whole (modules_to_save): the same shape as the model's
            weight = params.get(key)
            if weight is None or tuple(weight.shape) != tuple(factor.shape):
                raise ValueError(f"adapter {adapter_dir} saves {key!r} with shape {tuple(factor.shape)}, which this "
                                 f"{type(model).__name__} does not have (recorded base: {recorded!r})")
            continue
        site, _, part = key.removesuffix(".weight").removesuffix(".bias").rpartition(".lora_")
        inner = site.endswith(".base_layer")
        site = site.removesuffix(".base_layer")
        targets = stacked.get(site)
        weight = params.get(targets[0 if inner else -1] if targets else f"{site}.weight")
        if weight is None:
            raise ValueError(f"adapter {adapter_dir} edits {site!r}, which this {type(model).__name__} does not have; "
                             f"was it made for another architecture (recorded base: {recorded!r})?")
        if key.endswith(".bias") or not _factor_fits(part, factor, weight, model, site):
            if key.endswith(".bias") and factor.ndim == 1:
                continue
            raise ValueError(f"adapter {adapter_dir}: lora_{part} of {site!r} has shape {tuple(factor.shape)}, which "
                             f"does not fit the model's weight {tuple(weight.shape)} (recorded base: {recorded!r})")


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path, base_model: str | None = None) -> PeftModel:
    """`PeftModel.from_pretrained`, after `check_adapter_fits`: the adapter checked against this base first."""
    check_adapter_fits(model, adapter_dir, base_model)
    return PeftModel.from_pretrained(model, str(adapter_dir))
