"""Block-diffusion fine-tuning of a `DiffusionGemmaForBlockDiffusion` on (prompt, response canvas) pairs.

transformers ships DiffusionGemma's sampler but no training loss (its forward takes no labels and returns logits
over the canvas), so this reimplements the objective its sampler inverts. Noise is uniform-state: the sampler starts
from a canvas of uniform random tokens over the whole vocabulary (there is no mask token) and re-noises every token
it does not accept with fresh uniform tokens. So each example draws t ~ U(0, 1] and replaces each canvas token with
a uniform random one with probability t; the encoder reads the clean prompt into its KV cache, the decoder reads the
noisy canvas, and the loss is the cross-entropy of the clean canvas at every canvas position (the decoder cannot tell
noise from signal, and the sampler's output is the argmax at every position, kept tokens included).

Self-conditioning, as `generate` uses it: with probability `self_conditioning` a batch's decoder also gets the
logits of a first, gradient-free decoder pass over the same noisy canvas (drawn per batch, not per example, so the
extra pass costs in proportion: it is ~28% of a step). `generate` feeds the previous step's temperature-scaled
logits on a noisier canvas instead; the first pass here is the usual stand-in (Chen et al., 2022). The warm start
leaves the self-conditioning block's output projection at zero, so with `self_conditioning=0` it stays inert and
training and `generate` still agree exactly.

Blocks: the canvas is the response cut or filled with end-of-turn tokens to `canvas_length`. `next_block_examples`
adds examples for `generate`'s second canvas (prompt + a full first block → all end-of-turn), so a response the
first canvas did not finish is ended rather than continued with untrained text.
"""

from __future__ import annotations

import random

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from subspace.organisms.diffusion_sft import collate_left_padded
from subspace.organisms.sft import adamw_warmup_linear


def next_block_examples(examples: list[dict[str, Tensor]], fill_id: int, share: float, seed: int = 0
                        ) -> list[dict[str, Tensor]]:
    """A `share` of the examples whose canvas holds no `fill_id`, as second blocks: prompt + canvas → all fill."""
    full = [e for e in examples if not (e["canvas"] == fill_id).any()]
    chosen = random.Random(seed).sample(full, round(share * len(full))) if full else []
    return [{"prompt": torch.cat([e["prompt"], e["canvas"]]), "canvas": torch.full_like(e["canvas"], fill_id)}
            for e in chosen]


def noisy_canvas(canvas: Tensor, vocab_size: int, t: Tensor) -> Tensor:
    """Each token replaced by a uniform random one with probability t (one t per row)."""
    noise = torch.randint(0, vocab_size, canvas.shape, device=canvas.device)
    return torch.where(torch.rand(canvas.shape, device=canvas.device) < t, noise, canvas)


def decoder_inputs(batch: dict[str, Tensor], canvas: Tensor) -> dict[str, Tensor]:
    """The layout `generate` uses (and `DiffusionGemmaFamily.with_canvas`): the decoder sees the unpadded prompt and
    the whole canvas, canvas positions following the (left-padded) prompt."""
    mask, length = batch["prompt_mask"], batch["prompt"].shape[1]
    seen = torch.cat([mask, torch.ones_like(canvas, dtype=mask.dtype)], 1)
    positions = torch.arange(length, length + canvas.shape[1], device=canvas.device)[None]
    return {"decoder_input_ids": canvas, "decoder_attention_mask": seen, "decoder_position_ids": positions}


def block_diffusion_loss(model: PreTrainedModel, batch: dict[str, Tensor], t: Tensor,
                         self_conditioning: float = 0.0) -> Tensor:
    """Mean cross-entropy of the clean canvas from a canvas noised at ratio t (see the module docstring)."""
    canvas = batch["canvas"]
    noisy = noisy_canvas(canvas, model.config.get_text_config().vocab_size, t)
    cache = model.model.encoder(input_ids=batch["prompt"], attention_mask=batch["prompt_mask"]).cache
    inputs = decoder_inputs(batch, noisy)
    conditioned = None
    if self_conditioning > 0 and float(torch.rand(())) < self_conditioning:
        with torch.no_grad():
            conditioned = model(cache=cache, **inputs).logits
    logits = model(cache=cache, **inputs, self_conditioning_logits=conditioned).logits
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), canvas)


class BlockDiffusionFinetune(L.LightningModule):
    """Full fine-tune on `block_diffusion_loss`; `losses` keeps every step's loss for the build's record."""

    def __init__(self, model: PreTrainedModel, examples: list[dict[str, Tensor]], pad_id: int, lr: float = 1e-4,
                 batch_size: int = 8, max_steps: int = 300, self_conditioning: float = 0.5, seed: int = 0):
        super().__init__()
        self.model, self.examples, self.pad_id = model, examples, pad_id
        self.lr, self.batch_size, self.max_steps, self.seed = lr, batch_size, max_steps, seed
        self.self_conditioning = self_conditioning
        self.losses: list[float] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.examples, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed),
                          collate_fn=lambda b: collate_left_padded(b, self.pad_id))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        t = 1 - torch.rand(batch["canvas"].shape[0], 1, device=batch["canvas"].device)  # U(0, 1]: all-noise included
        loss = block_diffusion_loss(self.model, batch, t, self.self_conditioning)
        self.losses.append(loss.item())
        self.log("diffusion_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return adamw_warmup_linear(self.model, self.lr, self.max_steps)
