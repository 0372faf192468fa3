"""LLaDA in plain PyTorch: bidirectional Llama-style blocks under LLaDA's own parameter names.

The module tree reproduces the published checkpoint's keys (`model.transformer.wte`,
`model.transformer.blocks.N.{attn_norm, q_proj, k_proj, v_proj, attn_out, ff_norm, ff_proj, up_proj,
ff_out}`, `model.transformer.ln_f`, `model.transformer.ff_out`), so its safetensors load with
`strict=True` and no remote code. `ff_proj` is the gate, `up_proj` the up and `ff_out` the down
projection; `attn_out` and `ff_out` are the two matrices of each block that write into the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from subspace.models.llada.configuration import LLaDAConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary position embedding (half-split layout), computed in float32. x: [B, H, T, hd]; positions: [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, device=x.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None, :, None] * inv_freq  # [B, 1, T, half]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float()[..., :half], x.float()[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class LLaDABlock(nn.Module):
    """Pre-norm block: x + attn_out(Attn(attn_norm(x))), then + ff_out(silu(ff_proj(·)) · up_proj(·)). No causal mask."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim, self.theta = config.n_heads, config.n_kv_heads, hd, config.rope_theta
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x: Tensor, positions: Tensor, key_mask: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, positions, self.theta), rotary(k, positions, self.theta)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    """The `model.transformer` tree of the published checkpoint."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        modules = {"wte": nn.Embedding(config.embedding_size, config.d_model),
                   "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
                   "ln_f": RMSNorm(config.d_model, config.rms_norm_eps)}
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)


@dataclass
class LLaDAOutput(ModelOutput):
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None


class LLaDAModelLM(PreTrainedModel):
    """LLaDA with `logits[:, j]` always the prediction for token j (see `LLaDAConfig.shift_logits`)."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                output_hidden_states: bool = False, logits_to_keep: int = 0, **unused) -> LLaDAOutput:
        """Logits for every position, or the last `logits_to_keep` (the canvas: the LM head over a 126k
        vocabulary is the largest activation); `attention_mask` (1 = token, 0 = padding) hides padding.

        Positions count real tokens only, so a left-padded prompt gets the same rotary phases as
        alone (the published code counts padding too; rotary attention is shift-invariant, so the
        two agree up to rounding).
        """
        tr = self.model.transformer
        x = tr.wte(input_ids)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask[:, None, None, :].bool()
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = [x] if output_hidden_states else None
        for block in tr.blocks:
            x = block(x, position_ids, key_mask)
            if hidden is not None:
                hidden.append(x)
        x = tr.ln_f(x)
        if hidden is not None:
            hidden[-1] = x
        shift = int(self.config.shift_logits)
        keep = logits_to_keep if 0 < logits_to_keep < x.shape[1] else 0
        if keep:  # with shifted logits, position j reads the head at j−1
            x = x[:, x.shape[1] - keep - shift: x.shape[1] - shift]
        logits = F.linear(x, tr.wte.weight) if self.config.weight_tying else tr.ff_out(x)
        if shift and not keep:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return LLaDAOutput(logits=logits, hidden_states=tuple(hidden) if hidden is not None else None)
