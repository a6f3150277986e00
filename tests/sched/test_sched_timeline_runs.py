"""NodeTimeline keeps back-to-back ops as runs; every answer is the per-op timeline's, float for float.

The reference is PlainTimeline (timeline_reference.py): one sorted list of every op's interval
per stage, scanned from the start. Compared exactly (==): the per-op intervals, the horizon,
earliest() (jumping queued training and not) at every boundary and around it, forecast_chain,
and chains committed after queries and after an overlapping add.
"""
from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from timeline_reference import PlainTimeline, plain_build

from lemix.sched.forecast import NodeTimeline, build_from_runs, forecast_chain


def runs_count(tl: NodeTimeline, stage: int) -> int:
    return len(tl._en[stage])


# ---------------------------------------------------------------------------- by hand
def test_chunks_of_one_micro_batch_are_one_run_with_their_own_ends():
    tl = build_from_runs(1, 0.0, [], [(0.0, [(0, [1.0, 1.0, 1.0, 1.0])], True),
                                      (0.0, [(0, [2.0])], True)])   # queued behind: back to back
    assert runs_count(tl, 0) == 1
    assert tl.iv[0] == [(0.0, 1.0, True), (1.0, 2.0, True), (2.0, 3.0, True), (3.0, 4.0, True),
                        (4.0, 6.0, True)]
    assert tl.earliest(0, 2.5, 0.5, False) == (6.0, 6.0)
    # jumping training: only the op covering `ready` blocks, until its own end (3, not 6), and
    # the op ending by `ready` (the second, at 2) is the op before
    assert tl.earliest(0, 2.5, 0.5, True) == (3.0, 3.0)
    assert tl.earliest(0, 2.0, 0.5, True) == (2.0, 2.0)   # (2, 3) starts at ready: jumped
    assert tl.earliest(0, 0.0, 0.5, True) == (0.0, -1.0)
    assert tl.horizon_s == 0.0


def test_jump_walks_the_inference_runs_between_training_runs():
    tl = NodeTimeline(1, 0.0)
    tl.chain([(0, 1.0), (0, 1.0)], 0.0, True)         # training [0, 2]
    tl.chain([(0, 1.0), (0, 1.0)], 2.0, False)        # inference [2, 4]: its own run
    tl.chain([(0, 3.0)], 4.0, True)                   # training [4, 7]
    tl.chain([(0, 1.0)], 7.5, False)                  # inference [7.5, 8.5]
    assert [runs_count(tl, 0), len(tl.iv[0])] == [4, 6]
    ref = PlainTimeline(1)
    for start, end, train in tl.iv[0]:
        ref.add(0, start, end, train)
    for ready in (0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 7.5, 8.0, 9.0):
        for dur in (0.25, 0.5, 1.0, 3.0):
            for jump in (False, True):
                assert tl.earliest(0, ready, dur, jump) == ref.earliest(0, ready, dur, jump)
    assert tl.earliest(0, 1.5, 0.5, True) == (4.0, 4.0)   # training op to 2, inference to 4
    assert tl.earliest(0, 1.5, 3.5, True) == (4.0, 4.0)   # training [4, 7] jumped: [4, 7.5) fits
    assert tl.earliest(0, 1.5, 0.5, False) == (7.0, 7.0)  # not jumped: the gap [7, 7.5)


def test_zero_length_op_at_a_boundary_inside_a_run_splits_it():
    tl = NodeTimeline(1, 0.0)
    tl.chain([(0, 1.0)] * 3, 0.0, True)                           # one run [0, 1, 2, 3]
    assert tl.chain([(0, 0.0)], 1.0, False) == 1.0                # fits at 1: zero-length
    assert tl.iv[0] == [(0.0, 1.0, True), (1.0, 1.0, False), (1.0, 2.0, True), (2.0, 3.0, True)]
    assert runs_count(tl, 0) == 3
    # a zero-length query stops at the first boundary, as the per-op walk does
    assert tl.earliest(0, 1.5, 0.0, False) == (2.0, 2.0)
    assert tl.earliest(0, 2.0, 0.0, False) == (2.0, 2.0)
    assert tl.earliest(0, 2.0, 0.0, True) == (2.0, 2.0)


def test_negligible_durations_stop_inside_a_run_as_the_per_op_walk_does():
    base = 1e6   # 1e-12 is below half an ulp there: base + 1e-12 == base
    tl = build_from_runs(1, base, [], [(base, [(0, [1.0, 1.0, 1.0])], True)])
    assert runs_count(tl, 0) == 1
    assert tl.earliest(0, base + 0.5, 1e-12, False) == (base + 1.0, base + 1.0)
    assert tl.earliest(0, base + 0.5, 1e-6, False) == (base + 3.0, base + 3.0)
    tl.chain([(0, 1e-12)], base + 1.0, False)   # placed at a boundary, as the per-op walk puts it
    assert tl.iv[0][1] == (base + 1.0, base + 1.0, False)


def test_overlapping_add_switches_to_plain_lists_with_the_same_answers():
    tl = build_from_runs(2, 0.0, [(0, 0.0, 2.0, True)], [(0.0, [(0, [1.0, 1.0]), (1, [1.0])], False)])
    ref = plain_build(2, 0.0, [(0, 0.0, 2.0, True)], [(0.0, [(0, [1.0, 1.0]), (1, [1.0])], False)])
    for t in (tl, ref):
        t.add(0, 1.0, 3.0, False)   # overlaps both ops on stage 0
        t.chain([(0, 1.0), (1, 2.0)], 0.5, True)
    assert tl.iv == ref.iv
    for ready in (0.0, 1.0, 2.0, 2.5, 4.0):
        for jump in (False, True):
            assert tl.earliest(0, ready, 1.0, jump) == ref.earliest(0, ready, 1.0, jump)


# ---------------------------------------------------------------------------- properties
BASES = (0.0, 3.0, 1e6, 2.0 ** 40)


@st.composite
def scenarios(draw):
    S = draw(st.integers(1, 3))
    base = draw(st.sampled_from(BASES))
    ulp = math.ulp(base + 64.0)
    grid = st.integers(0, 24).map(lambda k: base + 0.5 * k)   # ties and touching ends
    dur = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 0.25, 1e-12, ulp, ulp / 2, 1.5 * ulp]),
                    st.floats(0.0, 4.0))
    train = st.booleans()
    now = draw(grid)
    running = draw(st.lists(st.tuples(st.integers(0, S - 1), grid, grid, train), max_size=S + 1))
    running = [(s, min(a, now), e, tr) for s, a, e, tr in running]   # running ops started by now
    run = st.tuples(st.integers(0, S - 1), st.lists(dur, min_size=1, max_size=7))
    chains = draw(st.lists(st.tuples(grid, st.lists(run, min_size=1, max_size=2 * S), train), max_size=10))
    queries = draw(st.lists(st.tuples(st.integers(0, S - 1), grid, dur, st.booleans()), max_size=20))
    later = draw(st.lists(st.tuples(grid, st.lists(run, min_size=1, max_size=3), train), max_size=3))
    return S, now, running, chains, queries, later, dur


def assert_same_answers(tl: NodeTimeline, ref: PlainTimeline, S: int, queries, now: float) -> None:
    assert tl.iv == ref.iv
    assert tl.horizon_s == ref.horizon_s
    for s, ready, dur, jump in queries:
        assert tl.earliest(s, ready, dur, jump) == ref.earliest(s, ready, dur, jump)
    for s in range(S):   # every boundary, and just either side of it
        for start, end, _ in ref.iv[s]:
            for ready in (start, end, math.nextafter(end, -math.inf), math.nextafter(end, math.inf)):
                for dur in (0.0, 0.5, end - start):
                    for jump in (False, True):
                        assert tl.earliest(s, ready, dur, jump) == ref.earliest(s, ready, dur, jump)
    fwd = [q[2] for q in queries[:S]] + [0.5] * (S - len(queries[:S]))
    for jump in (False, True):
        for bwd in ([], fwd):
            assert (forecast_chain(tl, now, now, fwd, bwd, jump)
                    == forecast_chain(ref, now, now, fwd, bwd, jump))


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_runs_answer_as_the_per_op_timeline(sc):
    S, now, running, chains, queries, later, _ = sc
    tl = build_from_runs(S, now, running, chains)
    ref = plain_build(S, now, running, chains)
    assert_same_answers(tl, ref, S, queries, now)
    for ready, runs, train in later:   # committed after queries
        ops = [(s, d) for s, ds in runs for d in ds]
        assert tl.chain(ops, ready, train) == ref.chain(ops, ready, train)
    assert_same_answers(tl, ref, S, queries, now)


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.lists(st.tuples(st.integers(0, 2), st.integers(0, 24), st.integers(0, 6), st.booleans()),
                             min_size=1, max_size=3))
def test_direct_adds_overlapping_or_not_answer_as_the_per_op_timeline(sc, adds):
    S, now, running, chains, queries, later, _ = sc
    tl = build_from_runs(S, now, running, chains)
    ref = plain_build(S, now, running, chains)
    for s, a, length, train in adds:
        start = now + 0.5 * a
        for t in (tl, ref):
            t.add(s % S, start, start + 0.5 * length, train)
    for ready, runs, train in later:
        ops = [(s, d) for s, ds in runs for d in ds]
        assert tl.chain(ops, ready, train) == ref.chain(ops, ready, train)
    assert_same_answers(tl, ref, S, queries, now)
