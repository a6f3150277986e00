from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lemix.types import Task, TaskKind
from lemix.workload import FixedLengths, LognormalLengths, Trace, make_tasks, read_trace

EXCERPT = Path(__file__).parent / "data" / "azure_code_excerpt.csv"


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def kinds(tasks):
    return np.array([t.kind is TaskKind.TRAIN for t in tasks])


def check_ordered(tasks):
    assert [t.task_id for t in tasks] == list(range(len(tasks)))
    times = [t.arrival_s for t in tasks]
    assert times == sorted(times)


def test_poisson_share_is_fraction_of_all_tasks():
    tasks = make_tasks(arrival="poisson", rate_per_s=20.0, duration_s=500.0, train_share=0.3, rng=rng(1))
    check_ordered(tasks)
    assert abs(len(tasks) - 10_000) < 500
    assert abs(kinds(tasks).mean() - 0.3) < 0.02
    assert all(type(t) is Task for t in tasks)


def test_task_fields():
    tasks = make_tasks(arrival="gamma", rate_per_s=5.0, duration_s=100.0, burstiness=3.0,
                       length_model=FixedLengths(100, 20), train_share=0.5,
                       train_batch_size=4, train_seq_tokens=64, rng=rng(2))
    train = [t for t in tasks if t.is_train]
    infer = [t for t in tasks if not t.is_train]
    assert train and infer
    assert all(t.batch_size == 4 and t.prompt_tokens == 64 and t.output_tokens == 0 for t in train)
    assert all(t.batch_size == 1 and t.prompt_tokens == 100 and t.output_tokens == 20 for t in infer)
    assert all(isinstance(t.prompt_tokens, int) and isinstance(t.arrival_s, float) for t in tasks)


def test_train_seq_tokens_from_a_length_model():
    tasks = make_tasks(rate_per_s=10.0, duration_s=100.0, train_share=0.5, rng=rng(3),
                       train_seq_tokens=LognormalLengths(min_prompt=16, max_prompt=128))
    lens = {t.prompt_tokens for t in tasks if t.is_train}
    assert len(lens) > 10 and min(lens) >= 16 and max(lens) <= 128


def test_independent_train_rate():
    tasks = make_tasks(rate_per_s=10.0, duration_s=1000.0, train_rate_per_s=2.0, rng=rng(4))
    check_ordered(tasks)
    n_train = kinds(tasks).sum()
    assert abs(n_train - 2000) < 5 * np.sqrt(2000)
    assert abs((len(tasks) - n_train) - 10_000) < 5 * np.sqrt(10_000)


def test_trace_with_independent_train_rate():
    tr = Trace(np.linspace(0, 1000.0, 100), np.full(100, 8), np.full(100, 2))
    tasks = make_tasks(arrival="trace", trace=tr, train_rate_per_s=0.5, rng=rng(4))
    n_train = kinds(tasks).sum()
    assert len(tasks) - n_train == 100 and abs(n_train - 500) < 5 * np.sqrt(500)


def test_no_training_by_default():
    tasks = make_tasks(rate_per_s=10.0, duration_s=10.0, rng=rng(5))
    assert tasks and not kinds(tasks).any()


def test_trace_driven_training_rate():
    n, span = 4000, 1000.0
    tr = Trace(np.linspace(0, span, n), np.full(n, 100), np.full(n, 10))
    tasks = make_tasks(arrival="trace", trace=tr, train_share=0.2, rng=rng(6))
    check_ordered(tasks)
    is_train = kinds(tasks)
    assert (~is_train).sum() == n                           # the trace's requests, all of them
    expected = 4.0 * 0.2 / 0.8 * span                       # r_inf * share / (1 - share) * span
    assert abs(is_train.sum() - expected) < 5 * np.sqrt(expected)
    assert max(t.arrival_s for t in tasks if t.is_train) < span
    infer = [t for t in tasks if not t.is_train]
    np.testing.assert_allclose([t.arrival_s for t in infer], tr.arrival_s)


def test_trace_lengths_kept_unless_a_model_is_given():
    tr = read_trace(EXCERPT)
    tasks = make_tasks(arrival="trace", trace=tr, rng=rng(7))
    assert [t.prompt_tokens for t in tasks] == tr.prompt_tokens.tolist()
    assert [t.output_tokens for t in tasks] == tr.output_tokens.tolist()
    tasks = make_tasks(arrival="trace", trace=tr, length_model=FixedLengths(32, 4), rng=rng(7))
    assert {(t.prompt_tokens, t.output_tokens) for t in tasks} == {(32, 4)}


def test_ties_put_inference_first():
    tr = Trace(np.array([0.0, 1.0]), np.array([5, 5]), np.array([1, 1]))
    tasks = make_tasks(arrival="trace", trace=tr, rng=rng(8), train_share=0.5)
    check_ordered(tasks)
    assert tasks[0].kind is TaskKind.INFER and tasks[0].arrival_s == 0.0


def test_priority_share():
    tasks = make_tasks(rate_per_s=50.0, duration_s=100.0, train_share=0.2, priority_share=0.25, rng=rng(9))
    infer = [t for t in tasks if not t.is_train]
    assert abs(np.mean([t.priority for t in infer]) - 0.25) < 0.03
    assert all(t.priority == 0 for t in tasks if t.is_train)


def test_deterministic_for_a_seed():
    kw = dict(arrival="gamma", rate_per_s=3.0, duration_s=60.0, burstiness=2.0, train_share=0.3,
              priority_share=0.1, train_seq_tokens=LognormalLengths())
    assert make_tasks(rng=rng(11), **kw) == make_tasks(rng=rng(11), **kw)
    assert make_tasks(rng=rng(11), **kw) != make_tasks(rng=rng(12), **kw)


TRACE = Trace(np.array([0.0, 1.0]), np.array([5, 5]), np.array([1, 1]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rate_per_s=1.0, duration_s=10.0, train_share=0.1, train_rate_per_s=1.0), "not both"),
        (dict(arrival="uniform", rate_per_s=1.0, duration_s=10.0), "arrival must be one of"),
        (dict(rate_per_s=1.0), "needs rate_per_s and duration_s"),
        (dict(arrival="trace"), "needs a trace"),
        (dict(arrival="trace", trace=TRACE, rate_per_s=3.0), "trace sets the rate"),
        (dict(rate_per_s=1.0, duration_s=10.0, trace=TRACE), "use arrival='trace'"),
        (dict(rate_per_s=1.0, duration_s=10.0, burstiness=2.0), "burstiness applies"),
        (dict(rate_per_s=1.0, duration_s=10.0, train_share=1.5), r"train_share must be in \[0, 1\]"),
        (dict(arrival="trace", trace=TRACE, train_share=1.0), r"train_share must be in \[0, 1\)"),
        (dict(rate_per_s=1.0, duration_s=10.0, priority_share=-0.1), "priority_share"),
        (dict(rate_per_s=1.0, duration_s=10.0, train_batch_size=0), "train_batch_size"),
        (dict(rate_per_s=1.0, duration_s=10.0, train_share=0.5, train_seq_tokens=0), "train_seq_tokens"),
        (dict(rate_per_s=-1.0, duration_s=10.0), "rate_per_s must be >= 0"),
        (dict(rate_per_s=1.0, duration_s=10.0, train_rate_per_s=-2.0), "train_rate_per_s must be"),
        (dict(arrival="trace", trace=TRACE, train_rate_per_s=float("nan")), "train_rate_per_s must be"),
        (dict(rate_per_s=1.0, duration_s=10.0, train_share="half"), "train_share must be a number"),
    ],
)
def test_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_tasks(rng=rng(), **kwargs)


@settings(max_examples=40, deadline=None)
@given(
    arrival=st.sampled_from(["poisson", "gamma"]),
    rate=st.floats(0.0, 30.0),
    duration=st.floats(0.0, 30.0),
    share=st.one_of(st.none(), st.floats(0.0, 1.0)),
    seed=st.integers(0, 10**6),
)
def test_tasks_always_numbered_in_arrival_order(arrival, rate, duration, share, seed):
    tasks = make_tasks(arrival=arrival, rate_per_s=rate, duration_s=duration,
                       burstiness=2.0 if arrival == "gamma" else 1.0, train_share=share, rng=rng(seed))
    check_ordered(tasks)
    assert all(0 <= t.arrival_s < duration for t in tasks)
    if share == 0.0 or share is None:
        assert not kinds(tasks).any()
    if share == 1.0:
        assert kinds(tasks).all()
