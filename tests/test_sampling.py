"""Square-root balanced sampling: the formula, empirical frequencies, exact resume, sharding."""

import itertools
from collections import Counter

import pytest
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from instructblip_core.sampling import BalancedSampler, format_mixture, mixture_probabilities

SIZES = {"coco": 1600, "vqa": 400, "ocr": 100}  # sqrt: 40, 20, 10 -> 4/7, 2/7, 1/7
# Chi-square critical values at p = 0.001 (tables): a correct sampler fails 1 time in 1000,
# and with a fixed seed the test is deterministic anyway.
CHI2_CRITICAL_0_001 = {1: 10.828, 2: 13.816, 3: 16.266}


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def dataset_of(index, sizes):
    """Global ConcatDataset index -> dataset name."""
    for name, size in sizes.items():
        if index < size:
            return name
        index -= size
    raise AssertionError("index out of range")


def chi_square(counts: Counter, probabilities: dict, n: int) -> float:
    return sum((counts[name] - n * p) ** 2 / (n * p) for name, p in probabilities.items() if p > 0)


# ----------------------------------------------------------------------------- probabilities


def test_sqrt_probabilities_follow_the_paper():
    probs = mixture_probabilities(SIZES)
    assert probs == pytest.approx({"coco": 4 / 7, "vqa": 2 / 7, "ocr": 1 / 7})
    assert list(probs) == list(SIZES)


def test_proportional_for_the_ablation():
    probs = mixture_probabilities(SIZES, method="proportional")
    assert probs == pytest.approx({"coco": 16 / 21, "vqa": 4 / 21, "ocr": 1 / 21})


def test_a_weight_replaces_the_sqrt_size():
    # ocr's score 10 becomes 30: scores 40, 20, 30
    assert mixture_probabilities(SIZES, {"ocr": 30}) == pytest.approx({"coco": 4 / 9, "vqa": 2 / 9, "ocr": 3 / 9})
    assert mixture_probabilities(SIZES, {"vqa": 0})["vqa"] == 0
    # proportional: the weight replaces the size itself
    assert mixture_probabilities({"a": 100, "b": 300}, {"a": 300}, method="proportional") == pytest.approx({"a": 0.5, "b": 0.5})


@pytest.mark.parametrize(
    "sizes, weights, method, message",
    [
        ({}, None, "sqrt", "no datasets"),
        ({"a": 0}, None, "sqrt", "dataset 'a' has size 0"),
        ({"a": 3}, {"b": 1.0}, "sqrt", r"weights given for unknown datasets \['b'\]"),
        ({"a": 3}, {"a": -1.0}, "sqrt", "weight of dataset 'a' must be a finite number >= 0"),
        ({"a": 3}, {"a": 0.0}, "sqrt", "every dataset has weight 0"),
        ({"a": 3}, None, "uniform", "unknown sampling method 'uniform'"),
    ],
)
def test_bad_mixtures_are_refused(sizes, weights, method, message):
    with pytest.raises(ValueError, match=message):
        mixture_probabilities(sizes, weights, method)


def test_format_mixture_table():
    probs = mixture_probabilities(SIZES)
    table = format_mixture(SIZES, probs)
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "size", "probability", "per", "1000"]
    assert lines[1].split() == ["coco", "1,600", f"{4 / 7:.4f}", f"{4000 / 7:.1f}"]
    assert lines[3].split() == ["ocr", "100", f"{1 / 7:.4f}", f"{1000 / 7:.1f}"]
    assert lines[4].split() == ["total", "2,100", "1.0000", "1000.0"]


# ----------------------------------------------------------------------------- the stream


@pytest.mark.parametrize("method", ["sqrt", "proportional"])
def test_empirical_frequencies_match_the_formula(method):
    probs = mixture_probabilities(SIZES, method=method)
    n = 30_000
    counts = Counter(dataset_of(i, SIZES) for i in take(BalancedSampler(SIZES, probs, seed=0), n))
    assert chi_square(counts, probs, n) < CHI2_CRITICAL_0_001[len(SIZES) - 1], counts
    # and the formula is not trivially satisfied: the other method's probabilities are rejected
    other = mixture_probabilities(SIZES, method="proportional" if method == "sqrt" else "sqrt")
    assert chi_square(counts, other, n) > 100 * CHI2_CRITICAL_0_001[len(SIZES) - 1]


def test_each_dataset_is_walked_in_reshuffled_passes():
    sizes = {"small": 7, "big": 50}
    sampler = BalancedSampler(sizes, mixture_probabilities(sizes), seed=1)
    small = [i for i in take(sampler, 400) if i < 7]
    passes = [small[k : k + 7] for k in range(0, len(small) - 6, 7)]
    assert len(passes) >= 4
    for p in passes:
        assert sorted(p) == list(range(7))  # every index once per pass, none repeated early
    assert len({tuple(p) for p in passes}) > 1  # reshuffled between passes
    big = [i - 7 for i in take(BalancedSampler(sizes, mixture_probabilities(sizes), seed=1), 400) if i >= 7]
    assert sorted(big[:50]) == list(range(50))


def test_same_seed_same_stream_other_seed_other_stream():
    probs = mixture_probabilities(SIZES)
    a = take(BalancedSampler(SIZES, probs, seed=5), 2000)
    assert a == take(BalancedSampler(SIZES, probs, seed=5), 2000)
    assert a != take(BalancedSampler(SIZES, probs, seed=6), 2000)


def test_zero_probability_dataset_is_never_drawn():
    probs = mixture_probabilities(SIZES, {"vqa": 0})
    assert not any(1600 <= i < 2000 for i in take(BalancedSampler(SIZES, probs), 5000))


@pytest.mark.parametrize("stop", [1, 999, 4096, 5000])
def test_exact_resume_from_a_state_dict(stop):
    probs = mixture_probabilities(SIZES)
    full = take(BalancedSampler(SIZES, probs, seed=3), 9000)
    first = BalancedSampler(SIZES, probs, seed=3)
    assert take(first, stop) == full[:stop]
    state = first.state_dict()
    assert state["position"] == stop
    resumed = BalancedSampler(SIZES, probs, seed=3)
    resumed.load_state_dict(state)
    assert take(resumed, 9000 - stop) == full[stop:]


def test_resume_counts_what_was_consumed_not_what_was_prefetched():
    probs = mixture_probabilities(SIZES)
    full = take(BalancedSampler(SIZES, probs, seed=0), 300)
    sampler = BalancedSampler(SIZES, probs, seed=0)
    take(sampler, 200)  # the loader ran ahead; training used only 120
    state = sampler.state_dict(samples_consumed=120)
    resumed = BalancedSampler(SIZES, probs, seed=0)
    resumed.load_state_dict(state)
    assert take(resumed, 180) == full[120:]


def test_resume_with_another_mixture_is_refused():
    probs = mixture_probabilities(SIZES)
    state = BalancedSampler(SIZES, probs, seed=0).state_dict()
    other = BalancedSampler(SIZES, mixture_probabilities(SIZES, method="proportional"), seed=0)
    with pytest.raises(ValueError, match="sampler's probabilities changed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="sampler's seed changed"):
        BalancedSampler(SIZES, probs, seed=1).load_state_dict(state)


def test_shards_are_disjoint_shares_of_one_stream():
    probs = mixture_probabilities(SIZES)
    single = take(BalancedSampler(SIZES, probs, seed=2), 3000)
    shards = [take(BalancedSampler(SIZES, probs, seed=2, num_replicas=3, rank=r), 1000) for r in range(3)]
    for r in range(3):
        assert shards[r] == single[r::3]
    interleaved = [x for group in zip(*shards) for x in group]
    assert interleaved == single


def test_sharded_resume_and_resume_on_fewer_processes():
    probs = mixture_probabilities(SIZES)
    single = take(BalancedSampler(SIZES, probs, seed=2), 2000)
    ranks = [BalancedSampler(SIZES, probs, seed=2, num_replicas=2, rank=r) for r in range(2)]
    for sampler in ranks:
        take(sampler, 300)
    state = ranks[0].state_dict()
    assert state["position"] == 600
    one = BalancedSampler(SIZES, probs, seed=2)
    one.load_state_dict(state)  # a 2-process run continued on 1 process
    assert take(one, 400) == single[600:1000]
    three = BalancedSampler(SIZES, probs, seed=2, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="not a multiple of num_replicas=4"):
        three.load_state_dict({**state, "position": 602})


def test_finite_sampler_has_a_length_and_continues_between_epochs():
    probs = mixture_probabilities(SIZES)
    stream = take(BalancedSampler(SIZES, probs), 250)
    sampler = BalancedSampler(SIZES, probs, num_samples=100)
    assert len(sampler) == 100
    first, second = list(sampler), list(sampler)
    assert first == stream[:100] and second == stream[100:200]
    with pytest.raises(TypeError, match="no length"):
        len(BalancedSampler(SIZES, probs))


def test_probabilities_must_cover_the_datasets():
    with pytest.raises(ValueError, match="probabilities are for"):
        BalancedSampler(SIZES, {"coco": 1.0})
    with pytest.raises(ValueError, match="rank must be in"):
        BalancedSampler(SIZES, mixture_probabilities(SIZES), num_replicas=2, rank=2)


class _Named(Dataset):
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return f"{self.name}:{i}"


def test_drives_a_concat_dataset_through_a_dataloader():
    parts = {name: _Named(name, size) for name, size in SIZES.items()}
    concat = ConcatDataset(list(parts.values()))
    sampler = BalancedSampler(SIZES, mixture_probabilities(SIZES), seed=0, num_samples=64)
    loader = DataLoader(concat, batch_size=16, sampler=sampler, collate_fn=list, num_workers=2)
    items = [x for batch in loader for x in batch]
    expected = [concat[i] for i in take(BalancedSampler(SIZES, mixture_probabilities(SIZES), seed=0), 64)]
    assert items == expected
    assert all(0 <= int(x.split(":")[1]) < SIZES[x.split(":")[0]] for x in items)

