"""Measured cost of the project's own training step and sampler on a model with random weights.

The training step is `SubspaceModule.training_step` + backward + Adam, exactly as Lightning runs
it; the reference is a plain frozen forward+backward of the same two batches through the same
objective (the gradient flows to a zero probe added to the embeddings), so their ratio is the
overhead the projection hooks and the subspace add.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from subspace.families.base import Family
from subspace.training.checkpointing import checkpointed_layers
from subspace.training.subspace_module import LearnedSubspace, SubspaceModule

GIB = 1024 ** 3


def timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> dict[str, float | None]:
    """Mean seconds per call over `steps` calls after `warmup` calls, and the peak memory they reached."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None}


def random_prompts(family: Family, batch_size: int, length: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Random token ids below the mask token (if any), all attended: a stand-in for chat-templated prompts."""
    vocab = family.model.config.get_text_config().vocab_size  # composite configs (DiffusionGemma) keep it there
    high = min(vocab, getattr(family, "mask_id", vocab))
    ids = torch.randint(0, high, (batch_size, length), generator=generator).to(family.model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def profile_training_step(family: Family, batch_size: int, prompt_length: int, rank: int, kl_weight: float,
                          steps: int, warmup: int, seed: int = 0, kl_top_k: int | None = None,
                          gradient_checkpointing: bool = False) -> dict[str, float | None]:
    """Seconds, tokens/s and peak memory of one subspace training step (every layer edited, one basis per
    layer; with `gradient_checkpointing`, its layers recomputed in backward) and of the plain frozen
    forward+backward on the same batches (never checkpointed, so the ratio includes the recomputation)."""
    device = family.model.device
    generator = torch.Generator().manual_seed(seed)
    harmful = random_prompts(family, batch_size, prompt_length, generator)
    harmless = random_prompts(family, batch_size, prompt_length, generator)
    sites = family.writer_sites()
    layers = sorted({s.layer for s in sites})
    init = torch.randn(len(layers), family.hidden_size, rank, generator=generator)
    subspace = LearnedSubspace(init, [layers.index(s.layer) for s in sites])
    refusal_ids = torch.randint(0, harmful["input_ids"].max().item() + 1, (8,), generator=generator)
    module = SubspaceModule(family, [s.name for s in sites], subspace, refusal_ids, [harmless], kl_weight,
                            kl_top_k=kl_top_k).to(device)
    module.on_fit_start()
    optimizer = module.configure_optimizers()
    batch = {"harmful": harmful, "harmless": harmless | {"index": torch.arange(batch_size)}}

    def training_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()

    probe = torch.zeros(family.hidden_size, device=device, dtype=family.model.dtype, requires_grad=True)

    def frozen_forward_backward() -> None:
        refusal, kl = module.terms(module.harmful_logprobs(harmful), family.response_logprobs(harmless),
                                   torch.arange(batch_size))
        (refusal + kl_weight * kl).backward()
        probe.grad = None

    with module.hooks, checkpointed_layers(family.layers, gradient_checkpointing):
        step = timed(training_step, device, steps, warmup)
    handle = family.model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out + probe)
    try:
        plain = timed(frozen_forward_backward, device, steps, warmup)
    finally:
        handle.remove()
    tokens = 2 * batch_size * (prompt_length + getattr(family, "canvas_length", 0))
    return {"step_s": step["seconds"], "step_tokens_per_s": tokens / step["seconds"], "step_peak_gib": step["peak_gib"],
            "frozen_fwd_bwd_s": plain["seconds"], "frozen_fwd_bwd_peak_gib": plain["peak_gib"],
            "step_overhead_ratio": step["seconds"] / plain["seconds"], "tokens_per_step": tokens,
            "edited_sites": len(sites), "gradient_checkpointing": gradient_checkpointing}


def profile_sampler(family: Family, batch_size: int, prompt_length: int, gen_length: int,
                    seed: int = 0) -> dict[str, float | None]:
    """One run of the family's own sampler (greedy) on random prompts: seconds, new tokens/s, peak memory."""
    batch = random_prompts(family, batch_size, prompt_length, torch.Generator().manual_seed(seed))
    device = family.model.device
    result = timed(lambda: family.generate(None, batch, gen_length), device, steps=1, warmup=0)
    return {"sample_s": result["seconds"], "sample_new_tokens_per_s": batch_size * gen_length / result["seconds"],
            "sample_peak_gib": result["peak_gib"], "sample_gen_length": gen_length}
