"""Paired harmful/harmless batches for the subspace objective, in an order that survives a resume and that the
ranks of a distributed run share out."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler
from transformers import PreTrainedTokenizerBase

from subspace.families.base import Family


class RankShard(Sampler[int]):
    """One rank's share of each order `order` draws, cut as `DistributedSampler(shuffle=False)` cuts a dataset:
    the order padded with its first items to a multiple of `world_size`, then every `world_size`-th item from
    position `rank`. Ranks that draw the same order (the same seeded generator, consumed alike) get disjoint
    shares of it, the same number of items each, which together cover it (plus the padding, < `world_size` items).
    """

    def __init__(self, order: Sampler[int], rank: int, world_size: int):
        self.order = order
        self.positions = DistributedSampler(range(len(order)), num_replicas=world_size, rank=rank, shuffle=False)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[int]:
        order = list(self.order)
        return iter([order[i] for i in self.positions])


class ResumableShuffle:
    """Shuffled index batches of one prompt set, with a position that can be saved and restored.

    The order comes from the very machinery of `DataLoader(range(size), shuffle=True,
    generator=Generator().manual_seed(seed))`, so runs keep the order they had before resuming
    existed. The state is that generator's state when the current pass began plus the batches taken
    from the pass: `resume()` rewinds the generator and skips those batches as index lists (nothing
    is tokenised), which leaves the generator exactly where it was.

    In a distributed run (`world_size` > 1) every rank draws that same permutation each pass, from the same
    seeded generator, and batches only its `RankShard` of it: rank r takes items r, r+W, r+2W, … (W the world
    size), the permutation padded with its first items to a multiple of W. So each pass the ranks' batches are
    disjoint (but for the padding) and together hold every prompt; every rank takes ceil(size/W) prompts in
    ceil(ceil(size/W)/batch_size) batches, the same count, so they step in lockstep. With `world_size` = 1 this
    is the single-process order above, batch for batch. The state is the same on every rank (generator and
    batch count do not depend on the rank): the one rank 0 checkpoints restores each rank to its own position.
    It records the world size, and a state saved under another world size is refused.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if size <= 0 or batch_size <= 0:
            raise ValueError(f"need ≥ 1 prompt and batch_size ≥ 1, got {size} prompts and batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 ≤ rank < world_size, got rank={rank} and world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        if world_size == 1:  # kept apart: a RankShard of one rank draws a different order from the 2nd pass on
            self.indices = DataLoader(range(size), batch_size=batch_size, shuffle=True, generator=self.generator,
                                      collate_fn=list)
        else:  # what shuffle=True builds, with the permutation sharded before batching
            shard = RankShard(RandomSampler(range(size), generator=self.generator), rank, world_size)
            self.indices = DataLoader(range(size), batch_size=batch_size, sampler=shard, generator=self.generator,
                                      collate_fn=list)
        self.pass_start = self.generator.get_state()
        self.taken = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[list[int]]:
        """A new pass, as a DataLoader's `iter()`."""
        self.pass_start, self.taken = self.generator.get_state(), 0
        return self._count(iter(self.indices))

    def resume(self) -> Iterator[list[int]]:
        """The rest of the pass the state describes."""
        self.generator.set_state(self.pass_start)
        batches = iter(self.indices)
        for _ in range(self.taken):
            next(batches)
        return self._count(batches)

    def _count(self, batches: Iterator[list[int]]) -> Iterator[list[int]]:
        for indices in batches:
            self.taken += 1
            yield indices

    def state_dict(self) -> dict[str, Any]:
        return {"pass_start": self.pass_start.clone(), "taken": self.taken, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = int(state.get("world_size", 1))  # states from before sharding: one process's order
        if saved != self.world_size:
            raise ValueError(f"the checkpoint's data position is in the order of a run on {saved} process(es), "
                             f"this run has {self.world_size}: each process's batches depend on the number of "
                             "processes, so resume with as many as the checkpointed run had")
        self.pass_start, self.taken = state["pass_start"].clone(), int(state["taken"])


class PairedBatches:
    """Steps of one batch from each stream; an epoch is the longest stream's pass, shorter ones start over
    when they run out (Lightning's `max_size_cycle`, which the order before resuming came from).

    Lightning checkpoints the position of a train loader only if it has `state_dict`/`load_state_dict`
    (a plain DataLoader replays its epoch from the start on resume), and it does not call `iter()` again
    when it resumes. So the pairing lives here, in one stateful iterable: the first `iter()` after
    `load_state_dict` continues the saved epoch, or starts the next one if the saved one was complete
    (every stream then starts a new pass, as at any epoch start); every other `iter()` starts a new epoch.
    The work happens at the first `next()`, so Lightning's probing `iter()` calls change nothing.

    In a distributed run each stream is one rank's shard (`ResumableShuffle(rank=…, world_size=…)`): every rank
    has the same number of steps per epoch and the same state, so rank 0's checkpointed state resumes them all.
    """

    def __init__(self, streams: dict[str, ResumableShuffle], make_batch: Callable[[str, list[int]], Any]):
        self.streams, self.make_batch = streams, make_batch
        self.step = 0  # steps taken in the current epoch
        self.resuming = False

    def __len__(self) -> int:
        return max(len(s) for s in self.streams.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        resuming, self.resuming = self.resuming, False
        if resuming:  # every stream's generator back where the checkpoint left it
            passes = {name: s.resume() for name, s in self.streams.items()}
        if not resuming or self.step >= len(self):
            self.step = 0
            passes = {name: iter(s) for name, s in self.streams.items()}
        while self.step < len(self):
            indices = {name: self._next(name, passes) for name in self.streams}
            self.step += 1
            yield {name: self.make_batch(name, ix) for name, ix in indices.items()}

    def _next(self, name: str, passes: dict[str, Iterator[list[int]]]) -> list[int]:
        try:
            return next(passes[name])
        except StopIteration:  # a shorter stream: start it over
            passes[name] = iter(self.streams[name])
            return next(passes[name])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "streams": {name: s.state_dict() for name, s in self.streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["streams"]) != set(self.streams):
            raise ValueError(f"the checkpoint's data streams {sorted(state['streams'])} are not this run's "
                             f"{sorted(self.streams)}")
        for name, s in self.streams.items():
            s.load_state_dict(state["streams"][name])
        self.step, self.resuming = int(state["step"]), True


class PairedPromptDataModule(L.LightningDataModule):
    """Each batch: {"harmful": chat batch, "harmless": chat batch + "index"} (index keys the cached original distributions).

    Under a data-parallel strategy (trainer=ddp, fsdp, deepspeed) each rank trains on its own shard of every pass
    (`ResumableShuffle`), as a `DistributedSampler` would give it: with W ranks one optimiser step averages the
    gradients of W distinct batches (an effective batch of W × batch_size), and an epoch, the larger prompt set's
    n prompts, takes ceil(ceil(n/W)/batch_size) steps instead of ceil(n/batch_size). "index" stays the prompt's
    index in the whole harmless set, which `harmless_batches()` covers in full on every rank. One process: the
    order as ever.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, family: Family, harmful: Sequence[str],
                 harmless: Sequence[str], batch_size: int = 8, system_prompt: str | None = None,
                 max_length: int | None = 256, seed: int = 0):
        super().__init__()
        self.tokenizer, self.family = tokenizer, family
        self.harmful, self.harmless = list(harmful), list(harmless)
        self.batch_size, self.system_prompt, self.max_length, self.seed = batch_size, system_prompt, max_length, seed

    def collate(self, prompts: list[str], indices: list[int] | None = None) -> dict[str, torch.Tensor]:
        batch = self.family.chat_batch(self.tokenizer, prompts, self.system_prompt, self.max_length)
        if indices is not None:
            batch["index"] = torch.tensor(indices)
        return batch

    def harmless_batches(self) -> list[dict[str, torch.Tensor]]:
        """The harmless prompts in order, batched: the original distributions are computed on these once and
        looked up by each training batch's "index"."""
        starts = range(0, len(self.harmless), self.batch_size)
        return [self.collate(self.harmless[i: i + self.batch_size]) for i in starts]

    def make_batch(self, name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        if name == "harmful":
            return self.collate([self.harmful[i] for i in indices])
        return self.collate([self.harmless[i] for i in indices], indices)

    def replica(self) -> tuple[int, int]:
        """(rank, number of data-parallel ranks) of this process: what the attached trainer's strategy would give a
        `DistributedSampler` (None, so (0, 1), for a single-device strategy), else `torch.distributed`'s when it is
        initialised, else (0, 1). The paired stream is not a DataLoader, so Lightning shards nothing itself."""
        if self.trainer is not None:
            kwargs = self.trainer.distributed_sampler_kwargs
            return (int(kwargs["rank"]), int(kwargs["num_replicas"])) if kwargs else (0, 1)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def train_dataloader(self) -> PairedBatches:
        rank, world_size = self.replica()
        streams = {"harmful": ResumableShuffle(len(self.harmful), self.batch_size, self.seed, rank, world_size),
                   "harmless": ResumableShuffle(len(self.harmless), self.batch_size, self.seed + 1, rank, world_size)}
        return PairedBatches(streams, self.make_batch)
