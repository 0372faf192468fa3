"""Per-layer geometry of two classes of residuals, on plain tensors (no model, no files).

Every function takes residuals laid out as the families return them, `[num_layers, n, d]`, so one
call answers for all layers at once: where the classes separate (probe accuracy), and how much of
the separating direction a given subspace holds (captured share).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_classes(harmful: Tensor, harmless: Tensor) -> None:
    if harmful.ndim != 3 or harmless.ndim != 3 or harmful.shape[::2] != harmless.shape[::2]:
        raise ValueError(f"residuals must be [num_layers, n, d] with the same layers and width; got harmful "
                         f"{tuple(harmful.shape)} and harmless {tuple(harmless.shape)}")
    for name, x in (("harmful", harmful), ("harmless", harmless)):
        if x.shape[1] < 2:
            raise ValueError(f"the probe needs at least 2 {name} prompts (one to fit, one to test); got {x.shape[1]}")


def _split(n: int, train_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random train/held-out split of n items with at least one item on each side."""
    order = torch.randperm(n, generator=generator)
    cut = min(max(1, int(n * train_fraction)), n - 1)
    return order[:cut], order[cut:]


def _fit_logistic(x: Tensor, y: Tensor, weight: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Weighted L2-regularised logistic regression for every layer at once: x [L, n, d], y/weight [n].

    The layers share no parameters, so the summed loss decouples and one L-BFGS run fits each layer's
    own probe; full-batch L-BFGS makes the fit deterministic. Call it with gradients enabled.
    """
    w = torch.zeros(x.shape[0], x.shape[2], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(x.shape[0], 1, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("lnd,ld->ln", x, w) + b
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y.expand_as(logits), reduction="none")
        loss = (losses * weight).sum() + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def probe_accuracy(harmful: Tensor, harmless: Tensor, train_fraction: float = 0.5, l2: float = 1e-2,
                   seed: int = 0, max_iter: int = 200) -> Tensor:
    """Held-out balanced accuracy of a linear probe per layer: [num_layers], 0.5 = no linear signal.

    A logistic regression is fitted on `train_fraction` of each class (features standardised with the
    fitting half's statistics, so a few huge residual dimensions do not dominate) and scored on the rest.
    Balanced accuracy (mean of the two per-class accuracies) keeps chance at 0.5 when the classes differ
    in size. The classes are split separately so both appear on each side.
    """
    _check_classes(harmful, harmless)
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction={train_fraction} must be in (0, 1)")
    if l2 < 0:
        raise ValueError(f"l2={l2} must be ≥ 0")
    generator = torch.Generator().manual_seed(seed)
    splits = [_split(x.shape[1], train_fraction, generator) for x in (harmful, harmless)]
    # callers may hold no_grad or inference mode (a Lightning hook): the fit needs autograd, on copies
    with torch.inference_mode(False), torch.enable_grad():
        harmful, harmless = (x.detach().to(torch.float64, copy=True) for x in (harmful, harmless))
        return _held_out_accuracy(harmful, harmless, splits, l2, max_iter)


def _held_out_accuracy(harmful: Tensor, harmless: Tensor, splits: list[tuple[Tensor, Tensor]], l2: float,
                       max_iter: int) -> Tensor:
    """Fit on each class's first index set, score balanced accuracy on its second."""
    (fit_h, test_h), (fit_s, test_s) = splits
    x_fit = torch.cat([harmful[:, fit_h], harmless[:, fit_s]], dim=1)
    mean, std = x_fit.mean(dim=1, keepdim=True), x_fit.std(dim=1, keepdim=True).nan_to_num(0.0).clamp_min(1e-6)
    standard = lambda x: (x - mean) / std  # noqa: E731
    y = torch.cat([torch.ones(len(fit_h)), torch.zeros(len(fit_s))]).double()
    weight = torch.cat([torch.full((len(fit_h),), 0.5 / len(fit_h)), torch.full((len(fit_s),), 0.5 / len(fit_s))])
    w, b = _fit_logistic(standard(x_fit), y, weight.double(), l2, max_iter)
    score = lambda x: torch.einsum("lnd,ld->ln", standard(x), w) + b  # noqa: E731
    hit_harmful = (score(harmful[:, test_h]) > 0).double().mean(dim=1)
    hit_harmless = (score(harmless[:, test_s]) <= 0).double().mean(dim=1)
    return (0.5 * (hit_harmful + hit_harmless)).float().detach()


def span(bases: Tensor, rtol: float = 1e-5) -> Tensor:
    """An orthonormal basis [d, r] of the union of the column spaces of `bases` [n, d, k].

    SVD rather than QR: when the sites share one subspace the stacked columns are linearly dependent,
    and QR would turn the dependent ones into arbitrary directions.
    """
    if bases.ndim != 3:
        raise ValueError(f"bases must be [n, d, k]; got {tuple(bases.shape)}")
    stacked = bases.float().permute(1, 0, 2).reshape(bases.shape[1], -1)
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    keep = s > rtol * s.max().clamp_min(torch.finfo(s.dtype).tiny)
    return u[:, keep]


def captured_share(vectors: Tensor, bases: Tensor) -> Tensor:
    """‖U Uᵀ r‖ / ‖r‖ per row: [L] from vectors [L, d] and orthonormal bases [L, d, k] (or one [d, k] for all).

    1 when r lies in span(U), 0 when orthogonal to it. Zero columns in a basis (padding) add nothing.
    A zero vector has no direction, so its share is NaN (undefined), not 0.
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be [L, d]; got {tuple(vectors.shape)}")
    bases = bases.float().expand(vectors.shape[0], -1, -1) if bases.ndim == 2 else bases.float()
    if bases.shape[:2] != vectors.shape:
        raise ValueError(f"bases {tuple(bases.shape)} do not match vectors {tuple(vectors.shape)} "
                         "(want [L, d, k] and [L, d])")
    vectors = vectors.float()
    coords = torch.einsum("ldk,ld->lk", bases, vectors)
    norms = vectors.norm(dim=-1)
    share = coords.norm(dim=-1) / norms
    return torch.where(norms > 0, share, torch.full_like(share, float("nan")))


def principal_components(x: Tensor, k: int = 2) -> Tensor:
    """Coordinates [n, k] of the rows of x [n, d] on their top-k principal axes (exact SVD, signs fixed).

    Exact rather than `torch.pca_lowrank`, whose random start would make two runs draw different plots.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"PCA needs a matrix [n ≥ 2, d]; got {tuple(x.shape)}")
    centred = x.float() - x.float().mean(dim=0)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    found = min(k, vh.shape[0])
    signs = torch.sign(vh[:found].sum(dim=1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    coords = u[:, :found] * s[:found] * signs
    # fewer axes than asked (d < k, or n ≤ k): pad with zeros so a scatter still gets its k coordinates
    return torch.cat([coords, coords.new_zeros(coords.shape[0], k - found)], dim=1)
