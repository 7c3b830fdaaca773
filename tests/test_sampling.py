"""The training sample stream: shuffled epochs, disjoint rank shards, resumable at any sample."""
import itertools

import pytest

from cwdseg.data.sampling import TrainSampleStream


def take(stream, n):
    return list(itertools.islice(stream, n))


def test_each_epoch_is_a_permutation_and_epochs_differ():
    keys = take(TrainSampleStream(10, seed=3), 30)
    epochs = [[i for i, _ in keys[e * 10:(e + 1) * 10]] for e in range(3)]
    for indices in epochs:
        assert sorted(indices) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2]
    assert len({seed for _, seed in keys}) == 30  # every sample gets its own augmentation seed


@pytest.mark.parametrize("start", [0, 1, 7, 10, 23])
def test_starting_at_k_equals_the_tail_of_the_full_stream(start):
    full = take(TrainSampleStream(10, seed=0), 40)
    resumed = take(TrainSampleStream(10, seed=0, start=start), 40 - start)
    assert resumed == full[start:]


def test_ranks_split_each_epoch_without_overlap():
    n, world = 11, 2  # one image dropped per epoch so that both ranks see the same count
    shards = [take(TrainSampleStream(n, seed=1, rank=r, world_size=world), n // world) for r in range(world)]
    seen = [i for shard in shards for i, _ in shard]
    assert len(seen) == len(set(seen)) == 10
    assert shards[0] != shards[1]


def test_seed_changes_the_order():
    assert take(TrainSampleStream(20, seed=0), 20) != take(TrainSampleStream(20, seed=1), 20)


def test_too_few_images_for_the_ranks():
    with pytest.raises(ValueError, match="3 training images cannot be split over 4 processes"):
        TrainSampleStream(3, world_size=4)
