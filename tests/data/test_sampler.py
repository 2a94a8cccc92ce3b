from itertools import islice

import pytest
import torch

from distill.data.module import ResumableSampler, epoch_permutation


def take(sampler: ResumableSampler, count: int) -> list[int]:
    return list(islice(iter(sampler), count))


def test_stream_is_seeded_permutations_one_per_epoch():
    stream = take(ResumableSampler(7, seed=5), 21)
    epochs = [stream[i : i + 7] for i in (0, 7, 14)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs == [epoch_permutation(7, 5 + e).tolist() for e in range(3)]
    assert epochs[0] != epochs[1]
    assert take(ResumableSampler(7, seed=5), 21) == stream


def test_different_seeds_give_different_orders():
    assert take(ResumableSampler(50, seed=0), 50) != take(ResumableSampler(50, seed=1), 50)


@pytest.mark.parametrize("start", [0, 3, 7, 12, 40])
def test_resume_at_start_yields_the_tail_of_the_stream(start):
    full = take(ResumableSampler(7, seed=3), 60)
    assert take(ResumableSampler(7, seed=3, start=start), 60 - start) == full[start:]


@pytest.mark.parametrize("start", [0, 6, 9])
def test_ranks_partition_the_global_stream(start):
    world, count = 3, 30
    full = take(ResumableSampler(10, seed=2), start + count)
    per_rank = [take(ResumableSampler(10, seed=2, start=start, rank=r, world_size=world), count // world) for r in range(world)]
    interleaved = [per_rank[j % world][j // world] for j in range(count)]
    assert interleaved == full[start:]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="rank=3"):
        ResumableSampler(10, seed=0, rank=3, world_size=3)
    with pytest.raises(ValueError, match="num_samples=0"):
        ResumableSampler(0, seed=0)
    with pytest.raises(ValueError, match="start=-1"):
        ResumableSampler(10, seed=0, start=-1)


def test_permutation_does_not_touch_the_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    take(ResumableSampler(10, seed=1), 25)
    assert torch.equal(torch.rand(3), expected)
