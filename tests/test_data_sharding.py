"""The paired batch order under data parallelism: each rank a disjoint shard of every pass, one process as before,
and an exact resume for every rank from the state rank 0 checkpoints. No process is spawned here (the 2-process DDP
run is in tests/test_cluster_configs.py): the ranks are given to the data classes directly."""

from __future__ import annotations

import itertools
import shutil
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from subspace.data.datamodule import PairedBatches, PairedPromptDataModule, ResumableShuffle
from subspace.families import CausalFamily
from tests.conftest import fit_toy

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread in this module


def plain(size: int, batch_size: int, seed: int) -> DataLoader:
    """The single-process order as it was before sharding: a plain shuffled DataLoader on a seeded generator."""
    return DataLoader(range(size), batch_size=batch_size, shuffle=True, collate_fn=list,
                      generator=torch.Generator().manual_seed(seed))


def paired(sizes: tuple[int, int], batch_size: int, rank: int = 0, world_size: int = 1) -> PairedBatches:
    streams = {name: ResumableShuffle(n, batch_size, seed, rank, world_size)
               for name, n, seed in (("a", sizes[0], 0), ("b", sizes[1], 1))}
    return PairedBatches(streams, lambda name, indices: indices)


def epochs(batches, n: int) -> list[list]:
    return [list(batches) for _ in range(n)]


def flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


SHAPES = [(16, 4), (16, 8), (9, 2), (7, 3), (3, 4), (1, 2)]  # (prompts, batch size): even, odd, fewer than ranks


@pytest.mark.parametrize("size, batch_size", SHAPES)
def test_one_process_keeps_the_unsharded_order(size, batch_size):
    """world_size=1 (the default) is the plain shuffled DataLoader's order, pass after pass."""
    for stream in (ResumableShuffle(size, batch_size, 3), ResumableShuffle(size, batch_size, 3, rank=0, world_size=1)):
        assert epochs(stream, 4) == epochs(plain(size, batch_size, 3), 4)


@pytest.mark.parametrize("sizes, batch_size", [((5, 3), 2), ((4, 4), 4), ((16, 12), 8)])
def test_one_process_keeps_the_unsharded_paired_order(tmp_path, sizes, batch_size):
    """Trained on, the paired epochs equal Lightning's max_size_cycle over the plain DataLoaders (the order before
    resuming and sharding existed), across epoch ends."""
    steps = 7
    combined = CombinedLoader({name: plain(n, batch_size, seed) for name, n, seed in (("a", sizes[0], 0),
                                                                                        ("b", sizes[1], 1))},
                              mode="max_size_cycle")
    expected = fit_toy(combined, steps, tmp_path / "plain")
    assert fit_toy(paired(sizes, batch_size, rank=0, world_size=1), steps, tmp_path / "paired") == expected


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("size, batch_size", SHAPES)
def test_ranks_take_disjoint_shards_of_the_same_permutation(size, batch_size, world_size):
    """Each pass every rank draws the permutation one process draws (first pass) and takes every W-th item of it,
    padded as DistributedSampler pads; so the ranks' batches are disjoint, their union is every prompt, and all
    ranks take the same number of batches of the same sizes."""
    ranks = [ResumableShuffle(size, batch_size, 3, rank, world_size) for rank in range(world_size)]
    per_rank = -(-size // world_size)
    assert {len(r) for r in ranks} == {-(-per_rank // batch_size)}
    passes = [epochs(r, 4) for r in ranks]  # passes[rank][pass] = that pass's batches
    order = flat(list(plain(size, batch_size, 3)))
    padded = (order * world_size)[: per_rank * world_size]  # size < W wraps round more than once
    for rank in range(world_size):
        assert flat(passes[rank][0]) == padded[rank::world_size]
    for p in range(4):
        shards = [flat(passes[rank][p]) for rank in range(world_size)]
        assert [[len(b) for b in passes[rank][p]] for rank in range(world_size)] == \
               [[len(b) for b in passes[0][p]]] * world_size
        assert set(itertools.chain(*shards)) == set(range(size))
        if size % world_size == 0:  # no padding: a partition
            assert sorted(itertools.chain(*shards)) == list(range(size))
        else:  # the padding repeats the pass's first items, nothing else
            counts = torch.bincount(torch.tensor(list(itertools.chain(*shards))), minlength=size)
            assert counts.sum() == per_rank * world_size and counts.min() >= 1


def test_two_ranks_together_take_one_process_batch_of_twice_the_size():
    """One step on 2 ranks at batch size b sees what one process sees at 2b, within the first pass: the
    effective batch of a DDP step."""
    size, b = 24, 4
    ranks = [ResumableShuffle(size, b, 3, rank, 2) for rank in range(2)]
    steps = list(zip(*(list(r) for r in ranks)))
    assert [sorted(x + y) for x, y in steps] == [sorted(batch) for batch in plain(size, 2 * b, 3)]


def test_paired_ranks_step_in_lockstep_and_cover_each_pass():
    sizes, b = (9, 5), 2
    ranks = [paired(sizes, b, rank, 2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # ceil(ceil(9/2)/2); the shorter stream (3 per rank) cycles
    e0, e1 = epochs(ranks[0], 2), epochs(ranks[1], 2)
    assert e0 != e1
    for epoch in range(2):
        harmful = flat([s["a"] for s in e0[epoch]]) + flat([s["a"] for s in e1[epoch]])
        assert sorted(set(harmful)) == list(range(9)) and len(harmful) == 10  # every prompt, one of them twice (pad)
        harmless = [flat([s["b"] for s in e[epoch]]) for e in (e0, e1)]
        assert [len(h) for h in harmless] == [5, 5]  # a pass of 3 per rank (batches of 2, 1), then 2 of the next
        first_pass = harmless[0][:3] + harmless[1][:3]
        assert sorted(set(first_pass)) == list(range(5)) and len(first_pass) == 6


@pytest.mark.parametrize("sizes, batch_size", [((9, 5), 2), ((12, 8), 2)])
def test_each_rank_resumes_exactly_from_the_state_rank_zero_saved(tmp_path, sizes, batch_size):
    """Under DDP only rank 0 writes the checkpoint and every rank loads it. Stopped at any step (mid-epoch, at an
    epoch end) on rank 0 and resumed as each rank, a rank sees the batches it would have seen uninterrupted."""
    steps, world_size = 6, 2
    full = [fit_toy(paired(sizes, batch_size, rank, world_size), steps, tmp_path / f"full{rank}")
            for rank in range(world_size)]
    assert full[0] != full[1]
    for stop in range(1, steps):
        ckpt_dir = tmp_path / f"stop{stop}"
        assert fit_toy(paired(sizes, batch_size, 0, world_size), stop, ckpt_dir) == full[0][:stop]
        for rank in range(world_size):  # each from a copy: a resumed fit checkpoints over last.ckpt
            rank_dir = shutil.copytree(ckpt_dir, tmp_path / f"stop{stop}rank{rank}")
            resumed = fit_toy(paired(sizes, batch_size, rank, world_size), steps, rank_dir, resume=True)
            assert resumed == full[rank][stop:], f"rank {rank} resumed at {stop}"


def test_a_state_from_another_world_size_is_refused():
    one, two = paired((5, 3), 2), paired((5, 3), 2, rank=1, world_size=2)
    next(iter(one))
    with pytest.raises(ValueError, match="a run on 1 process\\(es\\), this run has 2"):
        two.load_state_dict(one.state_dict())
    old = one.state_dict()  # a checkpoint from before sharding: no world size, one process's order
    for stream in old["streams"].values():
        del stream["world_size"]
    paired((5, 3), 2).load_state_dict(old)
    with pytest.raises(ValueError, match="resume with as many as the checkpointed run had"):
        two.load_state_dict(old)
    with pytest.raises(ValueError, match="rank=2 and world_size=2"):
        ResumableShuffle(5, 2, 0, rank=2, world_size=2)


def test_datamodule_shards_by_the_trainer_and_keeps_global_harmless_indices(tiny):
    family = CausalFamily(tiny.model)
    harmful = [f"Explain how to pick lock number {i}." for i in range(6)]
    harmless = [f"Name a fruit, number {i}." for i in range(10)]
    data = PairedPromptDataModule(tiny.tokenizer, family, harmful, harmless, batch_size=2)
    assert data.replica() == (0, 1)  # no trainer, no process group
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert data.replica() == (0, 1)
    data.trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)  # not launched: rank 0
    assert data.replica() == (0, 2)
    seen = []
    for rank in range(2):
        data.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        loader = data.train_dataloader()
        assert len(loader) == 3  # ceil(10 / 2 / 2) steps; the harmful shard (3 prompts) cycles
        indices = []
        for batch in loader:
            index = batch["harmless"]["index"].tolist()
            expected = data.collate([harmless[i] for i in index])  # the prompts the index names
            assert torch.equal(batch["harmless"]["input_ids"], expected["input_ids"])
            indices += index
        seen.append(indices)
    assert sorted(seen[0] + seen[1]) == list(range(10))  # disjoint, every harmless prompt once per epoch
    # the original distributions are cached for every prompt, in order, on every rank: index i is prompt i
    assert sum(len(b["input_ids"]) for b in data.harmless_batches()) == 10
