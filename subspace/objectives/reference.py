"""The original model's harmless distributions, cached once for the KL term: in full, or compactly as top-k."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from subspace.objectives.losses import coarse_kl_divergence, kl_divergence, remainder_logprob
from subspace.utils.digest import combined_digest, tensor_digest


def check_top_k(top_k: object) -> None:
    """`objective.kl_top_k` is null (full vocabulary) or a positive int; anything else is a config mistake."""
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"objective.kl_top_k={top_k!r} is not valid: use null (cache the full vocabulary) or an "
                         "integer ≥ 1 (cache that many most likely tokens per position, the rest pooled in one bin)")


@dataclass(frozen=True)
class ReferenceDistributions:
    """Original log-probabilities at the response positions, one row per harmless prompt, on which `kl` compares
    the edited model.

    Full (`ids` None): float32 log-probs [N, (positions,) vocab], 4·vocab bytes a position. Compact (top-k):
    the K most likely tokens' log-probs and int32 ids [N, (positions,) K] and the log of the remaining mass
    [N, (positions,)], 8·K + 4 bytes a position (≈ vocab / 2K times less); the KL is then the exact KL between
    the two distributions coarsened to those K+1 bins (`coarse_kl_divergence`), ≤ the full KL.
    """

    logprobs: Tensor
    ids: Tensor | None = None
    rest: Tensor | None = None

    @classmethod
    def of(cls, logprobs: Tensor, top_k: int | None = None) -> ReferenceDistributions:
        """One batch's log-probs [..., vocab], kept whole or cut to the top `top_k`. A `top_k` ≥ vocab drops
        nothing, so it keeps them whole: smaller than K = vocab with ids, and the KL exactly the default's."""
        if top_k is None or top_k >= logprobs.shape[-1]:
            return cls(logprobs)
        top, ids = logprobs.topk(top_k, dim=-1)
        return cls(top, ids.to(torch.int32), remainder_logprob(logprobs, ids))

    @classmethod
    def build(cls, batches: Iterable[Tensor], top_k: int | None = None) -> ReferenceDistributions:
        """Concatenate per-batch log-probs, each cut as it arrives (pass a generator), so that the full-vocabulary
        rows of every prompt are never held at once."""
        check_top_k(top_k)
        parts = [cls.of(logprobs, top_k) for logprobs in batches]
        if not parts:
            raise ValueError("no harmless batches: the KL term has no original distributions to compare against")
        return cls(*(None if ts[0] is None else torch.cat(ts) for ts in zip(*(p.tensors() for p in parts))))

    @staticmethod
    def position_bytes(vocab_size: int, top_k: int | None) -> int:
        """Bytes cached per response position (what `nbytes` counts), for memory estimates before a model exists."""
        return 4 * vocab_size if top_k is None or top_k >= vocab_size else 8 * top_k + 4

    @property
    def top_k(self) -> int | None:
        return None if self.ids is None else self.ids.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.nelement() * t.element_size() for t in self.tensors() if t is not None)

    def tensors(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return self.logprobs, self.ids, self.rest

    def _map(self, fn: Callable[[Tensor], Tensor]) -> ReferenceDistributions:
        return ReferenceDistributions(*(None if t is None else fn(t) for t in self.tensors()))

    def __getitem__(self, index: Tensor | slice | int) -> ReferenceDistributions:
        """The rows of the prompts `index` picks."""
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def to(self, device: torch.device | str) -> ReferenceDistributions:
        return self._map(lambda t: t.to(device))

    def digest(self) -> str:
        """What a checkpoint stores to refuse a resume against other originals. Full: the log-probs' digest, as
        before compact caches existed, so older checkpoints still resume. Compact: K and every cached tensor."""
        if self.ids is None:
            return tensor_digest(self.logprobs)
        return combined_digest(f"top_k={self.top_k}", *self.tensors())

    def kl(self, logprobs: Tensor) -> Tensor:
        """Mean KL(P_original ‖ P_edited) against the edited log-probs [..., vocab] of the same rows."""
        if self.ids is None:
            return kl_divergence(self.logprobs, logprobs)
        return coarse_kl_divergence(self.logprobs, self.ids, self.rest, logprobs)
