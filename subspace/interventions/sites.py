"""What an edit's site name points at in a model, and so which forms of the edit it supports.

- a linear writer (2-D `weight` [d, in]): projected at its output (hooks) or in its weight `W ← (I − λUUᵀ)W`;
  a transposed one (GPT-2's `Conv1D`, `weight` [in, d]) as `W ← W(I − λUUᵀ)`; a bias `b ← (I − λUUᵀ)b` too;
- stacked expert weights, a 3-D parameter `[num_experts, d, in]` (fused MoE experts), or `[num_experts, in, d]`
  where the experts module says so (`is_transposed`, gpt-oss), with a bias `<name>_bias` [num_experts, d] where it
  holds one: edited in weight form,
  since the experts' separate outputs are never materialised; `expert_mask` limits the edit to some experts
  (moe_scope=active_only). With every expert edited, an experts module known to sum its experts' outputs
  linearly (`sums_expert_outputs`) may instead be projected at its output: the same edit, `output_equivalent`;
- any other module (a MoE block, for moe_scope=layer_output): projected at its output only; it has no weight.

A site is named once, but its weights may be run by several module objects: DiffusionGemma's encoder and decoder
layers are distinct modules holding the same `Parameter`s. A hook fires only on the module it is registered on,
so `aliases` lists the other modules of the same class holding the site's parameters; hooks go on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from subspace.families.moe import sums_expert_outputs


FORMS = ("linear", "stacked", "output")
@dataclass(frozen=True)
class Site:
    """A resolved site: what the hooks attach to and what the weight form edits."""

    name: str
    module: nn.Module  # the writer; for stacked experts, the module holding the parameter
    form: str  # one of FORMS
    parameter: str | None = None  # "weight" of a linear writer, the stacked experts' parameter; None: output only
    expert_mask: Tensor | None = None  # bool [num_experts], stacked experts only
    aliases: tuple[nn.Module, ...] = ()  # other modules running the same parameters (tied encoder/decoder halves)
    transposed: bool = False  # the weight holds d in its last dim: Conv1D [in, d], transposed experts [E, in, d]
    bias: str | None = None  # the module's bias added to this writer's output ([d], or [E, d] for stacked experts)

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """Every module object that runs this site's weights: the hooks of the activation form go on each."""
        return (self.module, *self.aliases)

    @property
    def stacked(self) -> bool:
        """Stacked expert weights: the edit is applied to the parameter (or, when `output_equivalent`, equally to
        the experts module's output), never to a single expert's output."""
        return self.form == "stacked"

    @property
    def output_equivalent(self) -> bool:
        """Stacked experts whose weight edit equals projecting their module's output: every expert edited (no mask,
        or all set), and every module running them sums its experts' outputs linearly (`sums_expert_outputs`)."""
        return (self.stacked and (self.expert_mask is None or bool(self.expert_mask.all()))
                and all(sums_expert_outputs(m, self.parameter) for m in self.modules))

    @property
    def weight(self) -> nn.Parameter:
        if self.parameter is None:
            raise ValueError(f"site {self.name!r} is the output of a {type(self.module).__name__}, which has no weight "
                             "form (moe_scope=layer_output and edit_at=residual edits are hooks only; for merging "
                             "or export use the writers: moe_scope=all_experts, edit_at=writers)")
        return self.module._parameters[self.parameter]

    @property
    def parameter_name(self) -> str:
        """The parameter's name in the model, as `named_parameters` spells it."""
        return self.name if self.stacked else f"{self.name}.{self.parameter}"

    @property
    def bias_name(self) -> str | None:
        """The bias parameter's name in the model, if the writer adds one."""
        if self.bias is None:
            return None
        return f"{self.name.rpartition('.')[0]}.{self.bias}" if self.stacked else f"{self.name}.{self.bias}"

    @property
    def bias_tensor(self) -> nn.Parameter | None:
        return None if self.bias is None else self.module._parameters[self.bias]


Holders = dict[int, list[tuple[nn.Module, str]]]


def is_transposed_linear(module: nn.Module) -> bool:
    """A linear writer storing its weight [in, out] (`out = x W + b`): transformers' `Conv1D` (GPT-2 and kin)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def stacked_transposed(model: nn.Module, experts: nn.Module, weight: Tensor) -> bool:
    """Whether stacked writer weights `[E, a, b]` are stored `[E, in, d]` (applied as `x W_e`): as the experts module
    declares (`is_transposed`), else from the shapes: d (the model's hidden size) in the last dim and not in the
    middle one (Llama 4's experts say nothing and hold [E, in, d])."""
    declared = getattr(experts, "is_transposed", None)
    if isinstance(declared, bool):
        return declared
    config = getattr(model, "config", None)
    hidden = getattr(config.get_text_config(), "hidden_size", None) if config is not None else None
    return hidden is not None and weight.shape[-1] == hidden and weight.shape[-2] != hidden


def parameter_holders(model: nn.Module) -> Holders:
    """id(parameter) → every (module, attribute) holding it directly: two entries for one tied tensor."""
    holders: Holders = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append((module, attr))
    return holders


def tied_aliases(model: nn.Module, module: nn.Module, parameter: str | None = None,
                 holders: Holders | None = None) -> tuple[nn.Module, ...]:
    """The other modules of `module`'s class that hold the same parameter objects: all of its direct parameters,
    or just `parameter`. A module without direct parameters (a block) has none: aliasing is told by weights."""
    own = {a: p for a, p in module._parameters.items() if p is not None and (parameter is None or a == parameter)}
    if not own:
        return ()
    holders = parameter_holders(model) if holders is None else holders
    attr, first = next(iter(own.items()))
    return tuple(m for m, a in holders.get(id(first), []) if a == attr and m is not module and type(m) is type(module)
                 and all(m._parameters.get(n) is p for n, p in own.items()))


def resolve_site(model: nn.Module, name: str, expert_mask: Tensor | None = None,
                 holders: Holders | None = None) -> Site:
    """The site called `name`: a module name, or the name of a 3-D stacked-experts parameter."""
    parent_name, _, attr = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        stacked = parent._parameters.get(attr)
        module = model.get_submodule(name) if stacked is None else None
    except AttributeError as err:
        raise ValueError(f"site {name!r} is neither a module nor a stacked-experts parameter of "
                         f"{type(model).__name__}") from err
    if stacked is not None:
        if stacked.ndim != 3:
            raise ValueError(f"site {name!r} is a {stacked.ndim}-D parameter; a parameter site must be stacked expert "
                             "weights [num_experts, d, in] (name a Linear module for a 2-D weight)")
        if expert_mask is not None and tuple(expert_mask.shape) != (stacked.shape[0],):
            raise ValueError(f"expert mask for {name!r} has shape {tuple(expert_mask.shape)}, "
                             f"expected ({stacked.shape[0]},): one flag per expert")
        bias = f"{attr}_bias" if isinstance(parent._parameters.get(f"{attr}_bias"), Tensor) else None
        return Site(name, parent, "stacked", attr, None if expert_mask is None else expert_mask.bool().cpu(),
                    tied_aliases(model, parent, attr, holders), stacked_transposed(model, parent, stacked), bias)
    if expert_mask is not None:
        raise ValueError(f"site {name!r} is a {type(module).__name__}, not stacked expert weights: an expert mask "
                         "only applies to a 3-D experts parameter")
    weight = module._parameters.get("weight")
    if weight is not None and weight.ndim == 2:  # nn.Linear and look-alikes: out = W x (+ b); Conv1D: x W (+ b)
        bias = "bias" if isinstance(module._parameters.get("bias"), Tensor) else None
        return Site(name, module, "linear", "weight", aliases=tied_aliases(model, module, None, holders),
                    transposed=is_transposed_linear(module), bias=bias)
    return Site(name, module, "output", aliases=tied_aliases(model, module, None, holders))


def resolve_sites(model: nn.Module, names: list[str], expert_masks: dict[str, Tensor] | None = None) -> list[Site]:
    masks = expert_masks or {}
    if unknown := sorted(set(masks) - set(names)):
        raise ValueError(f"expert masks given for {unknown}, which are not among the edit's sites")
    holders = parameter_holders(model)
    return [resolve_site(model, name, masks.get(name), holders) for name in names]
