"""LLaDA's reverse process: low-confidence remasking over semi-autoregressive blocks.

The response canvas starts fully masked. It is filled block by block, left to right; inside a
block, each step predicts every masked position at once and commits the most confident
predictions, a fixed number per step, until the block holds no mask. This is the sampler the
published LLaDA generates with, re-implemented here so refusal is always judged on text the
model's own sampler produced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

REMASKING = ("low_confidence", "random")


def append_canvas(input_ids: Tensor, attention_mask: Tensor, canvas: Tensor) -> tuple[Tensor, Tensor]:
    """(prompt + canvas ids, attention mask): canvas positions are attended like prompt tokens."""
    ones = torch.ones(canvas.shape, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([input_ids, canvas], dim=1), torch.cat([attention_mask, ones], dim=1)


def tokens_per_step(block_length: int, steps: int) -> list[int]:
    """How many positions each step commits: as even as possible, the remainder first."""
    base, extra = divmod(block_length, steps)
    return [base + (i < extra) for i in range(steps)]


@dataclass
class MaskedDiffusionSampler:
    """`steps` is the total over all blocks; or `tokens_per_step` commits that many per step whatever the
    canvas length (both None: one token per step, the slowest and most careful)."""

    block_length: int = 32
    steps: int | None = None
    tokens_per_step: int | None = None
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.remasking not in REMASKING:
            raise ValueError(f"sampler.remasking={self.remasking!r} is not one of {REMASKING}")
        if self.block_length <= 0:
            raise ValueError(f"sampler.block_length={self.block_length} must be a positive integer")
        if self.tokens_per_step is not None:
            if self.steps is not None:
                raise ValueError(f"sampler.steps={self.steps} and sampler.tokens_per_step={self.tokens_per_step}: "
                                 "set one of them (the other null)")
            if self.tokens_per_step <= 0 or self.block_length % self.tokens_per_step:
                raise ValueError(f"sampler.tokens_per_step={self.tokens_per_step} must be a positive divisor of "
                                 f"sampler.block_length={self.block_length}")
        if self.temperature < 0 or self.cfg_scale < 0:
            raise ValueError(f"sampler.temperature={self.temperature} and cfg_scale={self.cfg_scale} must be ≥ 0")

    def schedule(self, gen_length: int) -> tuple[int, int]:
        """(number of blocks, steps per block), checked against gen_length."""
        if gen_length <= 0 or gen_length % self.block_length:
            raise ValueError(f"gen_length={gen_length} must be a positive multiple of sampler.block_length="
                             f"{self.block_length} (set eval.max_new_tokens accordingly)")
        blocks = gen_length // self.block_length
        steps = self.steps if self.steps is not None else gen_length // (self.tokens_per_step or 1)
        if steps % blocks or not blocks <= steps <= gen_length:
            raise ValueError(f"sampler.steps={self.steps} must be a multiple of the {blocks} blocks and at most "
                             f"gen_length={gen_length}")
        return blocks, steps // blocks

    def _logits(self, model: nn.Module, x: Tensor, attention_mask: Tensor, prompt: Tensor, mask_id: int,
                gen_length: int) -> Tensor:
        """Logits over the canvas only (the prompt's are never used), with classifier-free guidance if asked."""
        if self.cfg_scale == 0:
            return model(input_ids=x, attention_mask=attention_mask, logits_to_keep=gen_length).logits
        unconditional = x.masked_fill(prompt, mask_id)  # the same canvas with the prompt hidden
        both = model(input_ids=torch.cat([x, unconditional]), attention_mask=torch.cat([attention_mask] * 2),
                     logits_to_keep=gen_length).logits
        cond, uncond = both.chunk(2)
        return uncond + (self.cfg_scale + 1) * (cond - uncond)

    @torch.no_grad()
    def __call__(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, gen_length: int,
                 mask_id: int) -> Tensor:
        """The generated canvas, [batch, gen_length] token ids (left-padded prompts in, no mask left out)."""
        n_blocks, steps = self.schedule(gen_length)
        batch, prompt_length = input_ids.shape
        canvas = torch.full((batch, gen_length), mask_id, dtype=input_ids.dtype, device=input_ids.device)
        prompt = torch.zeros(batch, prompt_length + gen_length, dtype=torch.bool, device=input_ids.device)
        prompt[:, :prompt_length] = attention_mask.bool()
        generator = torch.Generator(device=input_ids.device).manual_seed(self.seed)
        for block in range(n_blocks):
            end = (block + 1) * self.block_length
            for k in tokens_per_step(self.block_length, steps):
                masked = canvas == mask_id
                masked[:, end:] = False
                x, x_mask = append_canvas(input_ids, attention_mask, canvas)
                logits = self._logits(model, x, x_mask, prompt, mask_id, gen_length).float()
                if self.temperature > 0:  # Gumbel-max sampling in float64, as LLaDA does
                    noise = torch.rand(logits.shape, generator=generator, device=x.device, dtype=torch.float64)
                    predicted = (logits.double() / self.temperature - torch.log(-torch.log(noise))).argmax(-1)
                else:
                    predicted = logits.argmax(-1)
                if self.remasking == "low_confidence":
                    confidence = torch.softmax(logits, -1).gather(-1, predicted[..., None]).squeeze(-1)
                else:
                    confidence = torch.rand(canvas.shape, generator=generator, device=x.device)
                chosen = confidence.masked_fill(~masked, -torch.inf).topk(k, dim=-1).indices
                canvas.scatter_(1, chosen, predicted.gather(1, chosen))
        return canvas
