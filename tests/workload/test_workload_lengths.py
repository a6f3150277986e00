import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lemix.workload import FixedLengths, LengthModel, LognormalLengths, Trace, TraceLengths


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_default_lognormal_medians_and_bounds():
    model = LognormalLengths()
    p, o = model.sample(20_000, rng(1))
    assert p.dtype == np.int64 and o.dtype == np.int64 and len(p) == len(o) == 20_000
    assert abs(np.median(p) - 256) < 15 and abs(np.median(o) - 64) < 4
    assert p.min() >= 8 and p.max() <= 4096 and o.min() >= 1 and o.max() <= 1024


def test_lognormal_clipping_bounds_are_arguments():
    model = LognormalLengths(min_prompt=4, max_prompt=32, max_output=16)
    p, o = model.sample(5000, rng(2))
    assert p.min() >= 4 and p.max() == 32 and o.max() == 16


def test_fixed_lengths():
    p, o = FixedLengths(128, 7).sample(3, rng())
    assert p.tolist() == [128, 128, 128] and o.tolist() == [7, 7, 7]
    assert FixedLengths(10).sample(0, rng())[0].shape == (0,)


def test_trace_lengths_resample_pairs_and_clip():
    tr = Trace(np.arange(4.0), np.array([10, 20, 30, 4000]), np.array([1, 2, 3, 900]))
    p, o = TraceLengths(tr).sample(1000, rng(3))
    pairs = set(zip(p.tolist(), o.tolist()))
    assert pairs == {(10, 1), (20, 2), (30, 3), (4000, 900)}   # correlation kept
    p, o = TraceLengths(tr, max_prompt=512, max_output=64).sample(1000, rng(3))
    assert p.max() == 512 and o.max() == 64


def test_all_models_satisfy_the_protocol_and_are_deterministic():
    tr = Trace(np.arange(3.0), np.array([5, 6, 7]), np.array([1, 1, 2]))
    for model in (LognormalLengths(), FixedLengths(3, 1), TraceLengths(tr)):
        assert isinstance(model, LengthModel)
        a, b = model.sample(50, rng(9)), model.sample(50, rng(9))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: LognormalLengths(prompt_median=0),
        lambda: LognormalLengths(output_sigma=-1),
        lambda: LognormalLengths(min_prompt=0),
        lambda: LognormalLengths(min_prompt=64, max_prompt=32),
        lambda: FixedLengths(0),
        lambda: FixedLengths(5, -1),
        lambda: TraceLengths(Trace(np.arange(1.0), np.array([5]), np.array([1])), max_output=-1),
        lambda: LognormalLengths().sample(-1, rng()),
    ],
)
def test_invalid(make):
    with pytest.raises(ValueError):
        make()


@settings(max_examples=40, deadline=None)
@given(lo=st.integers(1, 100), span=st.integers(0, 1000), n=st.integers(0, 200), seed=st.integers(0, 10**6))
def test_lognormal_within_bounds(lo, span, n, seed):
    model = LognormalLengths(min_prompt=lo, max_prompt=lo + span, min_output=lo, max_output=lo + span)
    p, o = model.sample(n, rng(seed))
    for x in (p, o):
        assert len(x) == n and (n == 0 or (x.min() >= lo and x.max() <= lo + span))
