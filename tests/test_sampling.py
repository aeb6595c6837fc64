"""Epoch orders, shards and resume positions of ``datamodules.sampling`` against torch's ``DistributedSampler`` and
against the samples an interrupted run had consumed."""

import itertools

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from datamodules.sampling import EpochSampler, ResumableLoader, sample_seed, split_key

DATA = list(range(23))  # not a multiple of any batch size or world size used below


def _shares(world: int, **options) -> list[list]:
    return [list(EpochSampler(DATA, rank=rank, world_size=world, **options)) for rank in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_training_shares_are_torchs_distributed_sampler(world, shuffle):
    for epoch in (0, 3):
        for rank in range(world):
            ours = EpochSampler(DATA, shuffle=shuffle, seed=5, rank=rank, world_size=world)
            theirs = DistributedSampler(DATA, num_replicas=world, rank=rank, shuffle=shuffle, seed=5)
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_shares_cover_every_sample_once(world):
    shares = _shares(world, shuffle=False, seed=0, even=False)
    assert sorted(itertools.chain(*shares)) == DATA
    assert [len(share) for share in shares] == [len(EpochSampler(DATA, shuffle=False, seed=0, rank=rank,
                                                                 world_size=world, even=False))
                                                for rank in range(world)]


def test_keyed_items_carry_a_seed_of_sample_and_epoch():
    sampler = EpochSampler(DATA, shuffle=True, seed=7, keyed=True)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert all(seed == sample_seed(7, 0, index) for index, seed in first)
    assert {index for index, _ in first} == set(DATA)
    assert dict(first) != dict(second)  # the same sample is augmented differently in the next epoch
    assert split_key(first[0]) == first[0] and split_key(4) == (4, None)


@pytest.mark.parametrize("new_world", [1, 2])
def test_a_resumed_epoch_sees_each_remaining_sample_on_the_same_or_fewer_processes(new_world):
    batch, old_world, done = 3, 2, 2  # two ranks finished 2 batches of 3 each: the first 12 positions are consumed
    consumed = set()
    for rank in range(old_world):
        share = list(EpochSampler(DATA, shuffle=True, seed=1, rank=rank, world_size=old_world))
        consumed |= set(share[: done * batch])
    resumed = []
    for rank in range(new_world):
        sampler = EpochSampler(DATA, shuffle=True, seed=1, rank=rank, world_size=new_world)
        sampler.resume(done * batch * old_world, done * batch)
        resumed.append(list(sampler))
        assert len(resumed[-1]) == len(sampler) - done * batch  # the loop's count of the epoch's remaining items
        assert len(list(sampler)) == len(sampler)  # the resume applies to one iteration only
    remaining = set(DATA) - consumed
    seen = list(itertools.chain(*resumed))
    assert remaining <= set(seen)  # fewer processes: the rest fits, plus samples from the start to fill the steps
    assert len(set(len(share) for share in resumed)) == 1  # equal shares: every rank runs the same steps


def test_on_more_processes_the_resumed_epoch_takes_the_steps_the_loop_expects_from_the_unconsumed_samples():
    batch, done = 3, 2  # one process finished 2 batches: the first 6 positions are consumed
    whole = list(EpochSampler(DATA, shuffle=True, seed=1))
    shares = []
    for rank in range(2):
        sampler = EpochSampler(DATA, shuffle=True, seed=1, rank=rank, world_size=2)
        sampler.resume(done * batch, done * batch)
        shares.append(list(sampler))
        assert len(shares[-1]) == len(sampler) - done * batch
    assert set(itertools.chain(*shares)) <= set(whole[done * batch:])  # nothing consumed is seen again


def test_on_the_same_processes_each_rank_continues_its_own_sequence():
    for rank in range(2):
        whole = list(EpochSampler(DATA, shuffle=True, seed=3, rank=rank, world_size=2, keyed=True))
        resumed = EpochSampler(DATA, shuffle=True, seed=3, rank=rank, world_size=2, keyed=True)
        resumed.resume(4 * 2, 4)
        assert list(resumed) == whole[4:]


def test_loader_state_is_the_consumed_samples_of_the_epoch():
    dataset = TensorDataset(torch.arange(23))
    sampler = EpochSampler(dataset, shuffle=True, seed=0, rank=1, world_size=2)
    progress = [(2, 6)]
    loader = ResumableLoader(dataset, batch_size=2, sampler=sampler, progress=lambda: progress[0])
    sampler.set_epoch(4)
    assert loader.state_dict() == {"epoch": 4, "batches": 2, "samples": 2 * 2 * 2}
    progress[0] = (6, 6)
    assert loader.state_dict() == {"epoch": 5, "batches": 0, "samples": 0}  # the next epoch starts afresh
    fresh = ResumableLoader(dataset, batch_size=2, sampler=EpochSampler(dataset, shuffle=True, seed=0, rank=1,
                                                                       world_size=2))
    fresh.load_state_dict({"epoch": 4, "batches": 2, "samples": 8})
    expected = EpochSampler(dataset, shuffle=True, seed=0, rank=1, world_size=2)
    expected.set_epoch(4)
    assert [int(value) for (values,) in fresh for value in values] == list(expected)[4:]
    with pytest.raises(TypeError, match="EpochSampler"):
        ResumableLoader(dataset, batch_size=2)
