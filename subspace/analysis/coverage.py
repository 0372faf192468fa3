"""Architecture coverage: every check of the matrix on a tiny random model of one transformers causal-LM class.

`check_class(model_type)` builds the class from its shrunk default config (`subspace.models.tiny_zoo`) and runs, in
order, each check, recording ✓ or the reason it failed (a check that cannot run because an earlier one failed is
left blank). Used by `tests/test_architectures.py` (one parametrised test per class) and `scripts/coverage.py`
(writes `docs/architectures.md`). Nothing here knows a module name: the family adapter finds the writers.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

CHECKS = ("build", "sites", "residual", "hooks_eq_weights", "peft", "merge_restores", "diff_means", "subspace")
CHECK_TITLES = {
    "build": "builds tiny",
    "sites": "writers found",
    "residual": "edit covers the residual",
    "hooks_eq_weights": "hooks = weights",
    "peft": "PEFT adapter",
    "merge_restores": "merge/unmerge exact",
    "diff_means": "diff-means fit",
    "subspace": "learned subspace fit",
}
TOL = 1e-4  # float32 logits: relative to their scale


@dataclass
class ClassReport:
    model_type: str
    class_name: str
    layers: int | None = None
    layers_path: str | None = None
    sites_per_layer: list[str] = field(default_factory=list)  # per layer: "KIND:MODULE,…" (forward order)
    post_norm: list[str] = field(default_factory=list)  # writers whose output passes a norm/scale before the residual
    results: dict[str, str] = field(default_factory=dict)  # check → "✓" or the reason it failed
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(self.results.get(c) == "✓" for c in CHECKS)

    @property
    def failure(self) -> str | None:
        return next((f"{c}: {self.results[c]}" for c in CHECKS if self.results.get(c, "✓") != "✓"), None)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _edit(family, sites: list[str], seed: int = 3):
    from subspace.interventions import ProjectionEdit, orthonormalize

    g = torch.Generator().manual_seed(seed)
    bases = orthonormalize(torch.randn(len(sites), family.hidden_size, 2, generator=g))
    return ProjectionEdit(sites, bases, torch.rand(len(sites), generator=g) * 0.5 + 0.5)


def _close(a: Tensor, b: Tensor) -> bool:
    return bool(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) < TOL)


def _residual_covered(model, family, edit, ids) -> str:
    """With the edit on every writer (hooks), what each layer adds to the residual stream has no component left along
    its subspace, for writers added as they are (post-norm ones act before their norm: not checked here)."""
    layers_io: dict[int, tuple[Tensor, Tensor]] = {}
    handles = []
    for i, layer in enumerate(family.layers):
        def hook(_m, args, kwargs, output, i=i):
            hidden = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.is_floating_point()
                           and a.shape[-1] == family.hidden_size), None)
            out = output[0] if isinstance(output, (tuple, list)) else output
            if hidden is not None and isinstance(out, Tensor) and i not in layers_io:
                layers_io[i] = (hidden.detach(), out.detach())
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with edit.applied(model):
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    by_layer: dict[int, list[int]] = {}
    sites = {s.name: s for s in family.writer_sites()}
    for index, name in enumerate(edit.sites):
        by_layer.setdefault(sites[name].layer, []).append(index)
    worst = 0.0
    for i, indices in by_layer.items():
        if any(sites[edit.sites[k]].after for k in indices) or i not in layers_io:
            continue
        basis = edit.bases[indices[0]]
        if any(not torch.equal(edit.bases[k], basis) or float(edit.strengths[k]) != 1.0 for k in indices):
            raise AssertionError("the residual check needs one subspace at strength 1 per layer")
        added = (layers_io[i][1] - layers_io[i][0]).float()
        worst = max(worst, float(((added @ basis).norm(dim=-1) / added.norm(dim=-1).clamp(min=1e-9)).max()))
    if worst > 1e-4:
        return f"a component along U of {worst:.2e} of what a layer adds is left: a residual writer was missed"
    return "✓"


def check_class(model_type: str, work_dir: str | Path | None = None, fits: bool = True) -> ClassReport:
    """Every check of the matrix on a tiny random `model_type` (see the module docstring)."""
    from subspace.models.tiny_zoo import causal_lm_classes

    report = ClassReport(model_type, causal_lm_classes()[model_type])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            _run_checks(report, Path(work_dir or tmp), fits)
        finally:
            logging.disable(previous)
    report.seconds = time.perf_counter() - start
    return report


def _run_checks(report: ClassReport, work: Path, fits: bool) -> None:
    from subspace.export.peft_adapter import export_peft_adapter, load_peft_adapter
    from subspace.families import family_for
    from subspace.interventions import ProjectionEdit
    from subspace.models.tiny import tiny_tokenizer
    from subspace.models.tiny_zoo import tiny_model_for

    tok = tiny_tokenizer()
    ids = torch.randint(3, len(tok), (2, 7), generator=torch.Generator().manual_seed(5))
    results = report.results
    try:
        model = tiny_model_for(report.model_type, tok)
        model(input_ids=ids)
        results["build"] = "✓"
    except Exception as err:  # noqa: BLE001
        results["build"] = f"the tiny model does not build or run: {_reason(err)}"
        return
    try:
        family = family_for(model)
        sites = family.writer_sites()
        report.layers, report.layers_path = family.num_layers, family.layers_path
        per_layer: dict[int, list[str]] = {}
        for s in sites:  # "kind:name within the layer"
            per_layer.setdefault(s.layer, []).append(f"{s.kind}:{s.name.removeprefix(f'{family.layers_path}.{s.layer}.')}")
        report.sites_per_layer = [",".join(per_layer.get(i, [])) for i in range(family.num_layers)]
        from subspace.interventions.sites import resolve_sites

        leaf = {s.name: s.name.removeprefix(f"{family.layers_path}.{s.layer}.") for s in sites}
        report.post_norm = sorted({f"{leaf[s.name]} → {s.after}" for s in sites if s.after})
        resolved = resolve_sites(model, [s.name for s in sites])
        for label, chosen in (("transposed", [r for r in resolved if r.transposed]),
                              ("biased", [r for r in resolved if r.bias is not None])):
            if chosen:
                report.post_norm.append(f"{label}: " + ", ".join(sorted({f"`{leaf[r.name]}`" for r in chosen})))
        if not sites or any(not per_layer.get(i) for i in range(family.num_layers)):
            raise TypeError("some layer has no residual writer")
        results["sites"] = "✓"
    except Exception as err:  # noqa: BLE001
        results["sites"] = _reason(err)
        return
    names = [s.name for s in sites]
    g = torch.Generator().manual_seed(1)
    try:
        layer_u = {i: torch.linalg.qr(torch.randn(family.hidden_size, 2, generator=g))[0] for i in per_layer}
        bases = torch.stack([layer_u[s.layer] for s in sites])
        results["residual"] = _residual_covered(model, family, ProjectionEdit(names, bases, torch.ones(len(names))),
                                                ids)
    except Exception as err:  # noqa: BLE001
        results["residual"] = _reason(err)
    edit = _edit(family, names)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        base_logits = model(input_ids=ids).logits
        with edit.applied(model):
            expected = model(input_ids=ids).logits
        if _close(expected, base_logits):
            raise AssertionError("the edit changes nothing")
        with edit.merged(model):
            merged = model(input_ids=ids).logits
        results["hooks_eq_weights"] = "✓" if _close(merged, expected) else (
            f"merged logits differ from hooked ones by {float((merged - expected).abs().max()):.2e}")
    except Exception as err:  # noqa: BLE001
        results["hooks_eq_weights"] = _reason(err)
        expected = None
    try:
        after = model.state_dict()
        results["merge_restores"] = "✓" if all(torch.equal(after[k], v) for k, v in original.items()) else (
            "a weight differs after the merge was undone")
    except Exception as err:  # noqa: BLE001
        results["merge_restores"] = _reason(err)
    try:
        if expected is None:
            raise AssertionError("no edited logits to compare with")
        adapter_dir = export_peft_adapter(edit, model, work / f"adapter-{report.model_type}")
        adapter = load_peft_adapter(copy.deepcopy(model), adapter_dir).eval()
        got = adapter(input_ids=ids).logits
        results["peft"] = "✓" if _close(got, expected) else (
            f"the loaded adapter's logits differ from the edited model's by {float((got - expected).abs().max()):.2e}")
    except Exception as err:  # noqa: BLE001
        results["peft"] = _reason(err)
    if fits:
        _fits(report, model, tok, family, work)


PREFIXES = torch.tensor([[5, 7], [5, 9], [6, 8]])  # fixed refusal openings for the prefix term: [R, K]


def _fits(report: ClassReport, model, tok, family, work: Path) -> None:
    import lightning as L

    from subspace.data.prompt_sets import PromptSets
    from subspace.evaluation.evaluator import Evaluator
    from subspace.methods.base import RunContext
    from subspace.methods.diff_means import DiffMeans
    from subspace.methods.subspace import Subspace
    from subspace.models.bundle import ModelBundle
    from subspace.objectives.refusal_kl import RefusalKLObjective

    class FixedRefusalTokens(RefusalKLObjective):
        """A random model refuses nothing: the tokens (or prefixes) the loss pushes down are fixed, not probed."""

        def refusal_token_ids(self, evaluator, harmful) -> Tensor:
            return PREFIXES if self.refusal == "prefix" else torch.tensor([5, 7])

    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    bundle = ModelBundle(model, tok, f"tiny-{report.model_type}")
    data = PromptSets("builtin:harmful_train", "builtin:harmless_train", "builtin:harmful_heldout",
                      "builtin:harmless_heldout", n_select=2, train_limit=4, eval_harmless_limit=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def trainer():
        return L.Trainer(max_steps=2, max_epochs=-1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=work)

    ctx = RunContext(bundle, family, data, Evaluator(bundle, family, progress=False), work, trainer)
    last = family.num_layers - 1
    try:
        edit = DiffMeans(source_layer=last).fit(ctx)
        with edit.applied(model):
            model(input_ids=torch.tensor([[3, 4, 5]]))
        if not bool(torch.isfinite(edit.bases).all()):
            raise ArithmeticError("the difference-of-means direction is not finite (non-finite residuals on the "
                                  "left-padded chat batch)")
        report.results["diff_means"] = "✓" if len(edit.sites) == len(family.writer_sites()) else (
            f"the edit has {len(edit.sites)} sites for {len(family.writer_sites())} writers")
    except Exception as err:  # noqa: BLE001
        report.results["diff_means"] = _reason(err) + " | " + traceback.format_exc(limit=-2).splitlines()[-3].strip()
    try:  # a family read left to right fits the causal default's prefix term
        refusal = "prefix" if family.reads_prefixes else "first_token"
        method = Subspace(objective=FixedRefusalTokens(refusal=refusal, prefix_tokens=2), rank=2, layers=[last],
                          batch_size=2, max_length=48, learn_strength=False, strength_init=0.5)
        edit = method.fit(ctx)
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        report.results["subspace"] = "✓" if edit.sites and unchanged else "the base model changed while fitting"
    except Exception as err:  # noqa: BLE001
        report.results["subspace"] = _reason(err) + " | " + traceback.format_exc(limit=-2).splitlines()[-3].strip()
